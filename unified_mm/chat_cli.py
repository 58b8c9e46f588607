"""Chat / VQA with an exported unified model, one-shot or interactive.

    python -m unified_mm.chat_cli --model EXPORT --image a.png --question "What colour is the circle?"
    python -m unified_mm.chat_cli --model EXPORT --out chat_images/          # interactive

Interactive mode reads lines from stdin: a line is a question; ``/image PATH`` attaches an image to
the next question, ``/reset`` forgets the conversation, ``/quit`` (or end of input) stops. When the
model answers with an image, it is saved as a PNG in ``--out`` and its path printed. Answers are
greedy unless ``--sample`` (then the export's sampler settings, or the flags, apply to text too).

Bad input (missing image, not an image, wrong size) is a one-line ``error: ...``: exit code 2 in
one-shot mode; in interactive mode the error is printed and the session goes on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import torch

from mmcore.errors import UserError, cli_entry
from tokenizer.images import save_png
from unified_mm.chat import ChatReply, ChatSession
from unified_mm.export import load_unified
from unified_mm.sample_cli import Parser, add_sampler_flags, check_device, settings_from_args

HELP = "commands: /image PATH (attach to the next question), /reset, /quit"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="python -m unified_mm.chat_cli", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="unified model export directory")
    parser.add_argument("--image", help="image for the (first) question")
    parser.add_argument("--question", help="ask one question, print the answer and exit")
    parser.add_argument("--out", default="chat_images", help="where image answers go (default chat_images/)")
    parser.add_argument("--sample", action="store_true", help="sample text answers instead of greedy")
    parser.add_argument("--max-new-tokens", type=int, help="text tokens per answer (default: the export's)")
    add_sampler_flags(parser)
    return parser.parse_args(argv)


class Chat:
    """The CLI's session: numbering and saving image answers, printing replies."""

    def __init__(self, session: ChatSession, args: argparse.Namespace, stream: TextIO):
        self.session, self.args, self.stream = session, args, stream
        self.images_saved = 0

    def save(self, codes: torch.Tensor) -> Path:
        self.images_saved += 1
        path = Path(self.args.out) / f"reply-{self.images_saved:03d}.png"
        return save_png(self.session.decode_image(codes), path)

    def ask(self, question: str, image_codes: torch.Tensor | None) -> ChatReply:
        reply = self.session.ask(question, image_codes=image_codes, greedy=not self.args.sample,
                                 max_new_tokens=self.args.max_new_tokens)
        if reply.image_codes is not None:
            print(f"[image: {self.save(reply.image_codes)}]", file=self.stream)
        if reply.text or reply.image_codes is None:
            print(reply.text, file=self.stream)
        self.stream.flush()
        return reply


def interactive(chat: Chat, lines: TextIO, image: torch.Tensor | None) -> None:
    """Read questions and commands until /quit or end of input; errors do not end the session."""
    if lines.isatty():
        print(HELP, file=sys.stderr)
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        try:
            if line == "/quit":
                return
            if line == "/reset":
                chat.session.reset()
                image = None
                print("(conversation reset)", file=chat.stream)
            elif line == "/image" or line.startswith("/image "):
                path = line[len("/image"):].strip()
                if not path:
                    raise UserError("/image needs a path")
                image = chat.session.encode_image(path)  # checked now, not at the next question
                print(f"(image attached: {path})", file=chat.stream)
            elif line.startswith("/"):
                raise UserError(f"unknown command {line.split()[0]!r}; {HELP}")
            else:
                chat.ask(line, image)
                image = None
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)


@cli_entry
def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_device(args.device)
    loaded = load_unified(args.model, device=args.device)
    session = ChatSession(loaded, settings_from_args(loaded.sampler_defaults, args))
    image = None if args.image is None else session.encode_image(args.image)  # bad path: fails first
    chat = Chat(session, args, sys.stdout)
    if args.question is not None:
        chat.ask(args.question, image)
    else:
        interactive(chat, stdin or sys.stdin, image)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
