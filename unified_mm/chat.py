"""Multi-turn chat / VQA with images by path, and image replies inside the conversation.

The history is rendered by :meth:`SequenceBuilder.chat_prompt`, the training template, so the
prompt of every turn is exactly the prefix of the training sequence of the same conversation
(``builder.chat(history)``), and a reply's ids followed by ``<eos>`` are exactly that sequence's
assistant segment.

Decoding a reply follows the assistant template ``<assistant> [<boi> img <eoi>] text <eos>``:

* text positions score text ids only (the LM head on ``[0, image_start)``), with the specials the
  template never produces in an answer (``<pad> <bos> <user> <assistant> <eoi>``) masked;
* ``<boi>`` may only be the *first* token of a reply (training only puts assistant images first,
  and only there can the history represent it), and only when the context has room for the span;
* after ``<boi>`` the span is sampled by :func:`unified_mm.sampling.sample_span` (structural
  constraint, the session's sampler settings, guidance against the unconditional generation
  prompt when ``cfg_scale != 1``), ``<eoi>`` is appended, and text decoding continues to ``<eos>``;
* ``<eos>`` is masked at the first position: training never shows an empty answer.

Text is greedy by default; ``greedy=False`` samples it with the session's temperature/top-k/top-p.
Images are always sampled with those settings (argmax images degenerate), from one session
generator seeded with ``settings.seed``, so a conversation replays identically.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from mmcore.errors import UserError
from tokenizer.export import LoadedTokenizer
from tokenizer.images import decode_to_pixels, encode_images, load_image
from unified_mm.export import LoadedUnified, load_qlip
from unified_mm.generate import DecodeState, advance, head_logits, model_device, prefill, select_rows
from unified_mm.sampling import (SamplerSettings, codes_to_span_ids, draw, sample_span, unconditional_prefix,
                                 with_unconditional)
from unified_mm.sequence import SequenceBuilder, Turn


class ChatReply(NamedTuple):
    text: str
    image_codes: torch.Tensor | None  # (N, G) long when the model answered with an image
    ids: list[int]  # generated ids, [<boi> img <eoi>] text, without the final <eos>


class _ImageStep(NamedTuple):
    codes: torch.Tensor  # (N, G) long, on the CPU
    state: DecodeState  # the conditional row after <eoi>


class ChatSession:
    """A conversation with one exported unified model (``unified_mm.export.load_unified``)."""

    def __init__(self, loaded: LoadedUnified, settings: SamplerSettings | None = None,
                 qlip: LoadedTokenizer | None = None):
        self.loaded = loaded
        self.model, self.vocab, self.tok = loaded.model, loaded.vocab, loaded.text_tokenizer
        self.settings = settings or SamplerSettings.from_defaults(loaded.sampler_defaults)
        self.max_new_tokens = int(loaded.sampler_defaults.get("max_new_tokens", 64))
        self.context = int(self.model.config.max_position_embeddings)
        self.builder = SequenceBuilder(self.tok, self.vocab, max_length=self.context)
        self._qlip = qlip
        self.history: list[Turn] = []
        self.last_prompt: list[int] = []  # the ids the last reply continued (for checks and debugging)
        self.generator = torch.Generator(device=model_device(self.model)).manual_seed(self.settings.seed)

    # -- images ------------------------------------------------------------------------------------
    @property
    def qlip(self) -> LoadedTokenizer:
        """The bundled QLIP tokenizer, loaded on first use (text-only chats never need it)."""
        if self._qlip is None:
            self._qlip = load_qlip(self.loaded)
        return self._qlip

    def encode_image(self, path: str | Path) -> torch.Tensor:
        """Image file → codes (N, G); UserError naming the file if missing, not an image or of the
        wrong size."""
        pixels = load_image(path, self.qlip.model.config.encoder.image_size)  # (3, S, S)
        _, group_indices = encode_images(self.qlip.model, pixels[None])  # (1, N, G)
        return group_indices[0]

    def decode_image(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (N, G) → pixels (3, S, S) in [-1, 1]."""
        return decode_to_pixels(self.qlip.model, codes[None])[0]

    # -- conversation ------------------------------------------------------------------------------
    def reset(self) -> None:
        self.history = []

    def ask(self, text: str, image_path: str | Path | None = None, greedy: bool = True,
            max_new_tokens: int | None = None, image_codes: torch.Tensor | None = None) -> ChatReply:
        """Append a user turn (text, optional image by path or codes), decode the assistant's reply,
        append it to the history and return it."""
        if image_path is not None:
            image_codes = self.encode_image(image_path)
        if not text.strip() and image_codes is None:
            raise UserError("empty question: give text, an image, or both")
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        user = Turn("user", text, image_codes)
        self.last_prompt = self._fit([*self.history, user], max_new_tokens)
        reply = self._reply(self.last_prompt, greedy, max_new_tokens)
        self.history += [user, Turn("assistant", reply.text, reply.image_codes)]
        return reply

    def _fit(self, turns: list[Turn], max_new_tokens: int) -> list[int]:
        """The prompt, dropping the oldest user/assistant pairs (from the history too: the session
        forgets them) until ``max_new_tokens`` more fit in the model's context."""
        while True:
            prompt = self.builder.chat_prompt(turns)
            if len(prompt) + max_new_tokens <= self.context:
                return prompt
            if len(turns) == 1:
                raise UserError(f"the question is {len(prompt)} tokens; with max_new_tokens "
                                f"{max_new_tokens} it does not fit the context ({self.context} tokens)")
            turns = turns[2:]
            self.history = self.history[2:]

    # -- decoding ----------------------------------------------------------------------------------
    def _text_mask(self, first: bool, after_image: bool, room: int) -> torch.Tensor:
        """Bool (image_start,): text/special ids allowed at this position of the reply."""
        allowed = torch.ones(self.vocab.image_start, dtype=torch.bool)
        tok = self.tok
        allowed[[tok.pad_id, tok.bos_id, tok.user_id, tok.assistant_id, tok.eoi_id]] = False
        if first and not after_image:
            allowed[tok.eos_id] = False  # no empty answers
        if not first or after_image or room < self.vocab.tokens_per_image + 3:  # <boi> img <eoi> <eos>
            allowed[tok.boi_id] = False
        return allowed.to(model_device(self.model))

    def _next_text_id(self, state: DecodeState, allowed: torch.Tensor, greedy: bool) -> int:
        logits = head_logits(self.model, state.hidden, 0, self.vocab.image_start)  # (1, image_start)
        logits = logits.masked_fill(~allowed, float("-inf"))
        if greedy:
            return int(logits.argmax(-1))
        return int(draw(logits, self.settings, [self.generator]))

    def _image(self, state: DecodeState) -> _ImageStep:
        """``state`` ends with ``<boi>``: sample the span, then feed its last id and ``<eoi>``."""
        uncond = unconditional_prefix(self.model, self.builder, self.settings)
        span = sample_span(self.model, self.vocab, with_unconditional(self.model, state, uncond), 1,
                           self.settings, [self.generator])
        cond = span.state if uncond is None else select_rows(self.model, span.state, torch.tensor([0]))
        ids = codes_to_span_ids(self.vocab, span.codes)  # (1, N·G)
        tail = torch.tensor([[int(ids[0, -1]), self.tok.eoi_id]], device=ids.device)
        codes = self.vocab.ids_to_codes(ids[0]).cpu()  # (N, code_groups): the tokenizer's grouping
        return _ImageStep(codes, advance(self.model, cond, tail))

    @torch.inference_mode()
    def _reply(self, prompt: list[int], greedy: bool, max_new_tokens: int) -> ChatReply:
        reserve = max_new_tokens + self.vocab.tokens_per_image + 2  # text, or <boi> img <eoi> and text
        state = prefill(self.model, [prompt], self.tok.pad_id, reserve=reserve)
        ids: list[int] = []
        text_ids: list[int] = []
        codes = None
        while len(text_ids) < max_new_tokens:
            room = self.context - int(state.next_positions[0])
            allowed = self._text_mask(first=not ids, after_image=codes is not None, room=room)
            token = self._next_text_id(state, allowed, greedy)
            if token == self.tok.eos_id:
                break
            if token == self.tok.boi_id:
                state = advance(self.model, state, torch.tensor([[token]], device=state.mask.device))
                codes, state = self._image(state)
                ids += [token, *self.vocab.codes_to_ids(codes).tolist(), self.tok.eoi_id]
                continue
            ids.append(token)
            text_ids.append(token)
            if len(text_ids) == max_new_tokens or room <= 1:
                break
            state = advance(self.model, state, torch.tensor([[token]], device=state.mask.device))
        return ChatReply(self.tok.decode(text_ids), codes, ids)
