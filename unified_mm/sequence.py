"""Task templates, labels and loss masks: the one place the unified model's sequences are rendered.

Training, chat and sampling all go through :class:`SequenceBuilder`, so an inference prompt is
always the exact prefix of the training sequence for the same content.

Templates (DESIGN.md §3, with our role specials ``<user>`` / ``<assistant>`` in place of the text
"USER:" / "ASSISTANT:": a special cannot be confused with, or split differently from, the text it
precedes, and it costs one token)::

    understanding / chat   <bos> <user> [<boi> img <eoi>] {question} <assistant> {answer} <eos>
                                 <user> [<boi> img <eoi>] {text2} <assistant> {answer2} <eos> ...
    assistant image turn   ... <assistant> <boi> img <eoi> <eos>
    generation (t2i)       <bos> <user> {caption} <assistant> <boi> img <eoi> <eos>
    caption dropped (CFG)  <bos> <user> <assistant> <boi> img <eoi> <eos>
    text-only              <bos> {text} <eos>

``img`` is exactly ``vocab.tokens_per_image`` ids (groups interleaved per patch, see
``unified_mm.vocab``); an image in a user turn goes at the start of the turn, an image in an
assistant turn before its (optional) text.

Labels are aligned with ids: ``labels[t] = ids[t]`` where the loss applies, else
:data:`IGNORE_INDEX`; the loss shifts (``logits[t]`` predicts ``labels[t + 1]``). The loss applies
to what the model must *produce*: every assistant turn's text ids, ``<boi>``, image ids, ``<eoi>``
and ``<eos>``; for text-only everything after ``<bos>``. ``<assistant>`` is not labelled (prompt).
``<boi>`` is labelled so that in a chat the model learns to open an image when one is asked
for; ``generation_prompt`` still ends with ``<boi>`` (text-to-image forces it).

Over-long samples (never an error; counted in :class:`SequenceStats`). An image span is never cut:
half an image is not an image the tokenizer can decode, and the span-length invariant is what the
sampler and the loss rely on.

* text-only: cut to ``max_length`` keeping ``<bos>`` ("text_truncated"; the final ``<eos>`` may be
  lost, which is right for a cut document: it did not end there).
* chat / understanding: drop whole trailing user+assistant pairs until it fits ("turns_dropped");
  if the first pair alone does not fit, the sample is skipped: ``None`` ("too_long").
* generation: cut the caption's tokens from the end until it fits ("caption_truncated"); if even an
  empty caption does not fit, ``None`` ("too_long"). ``generation_prompt`` cuts the same way, so
  the sampler conditions on what training saw.

Counts are per sample (one truncated sample counts 1, however many tokens or turns it lost).

Batches are right-padded to the longest sequence, not packed: our sequences are short and similar
in length (one image span plus a few dozen text tokens), so padding wastes little, while packing
needs per-document (block-diagonal) attention masks, which a stock ``LlamaForCausalLM`` with SDPA
does not give: packed documents would attend to each other.
"""
from __future__ import annotations

import collections
from collections.abc import Sequence as SequenceLike
from typing import NamedTuple

import numpy as np
import torch

from mmcore.errors import UserError
from mmcore.text_tokenizer import TextTokenizer
from unified_mm.vocab import Vocab

IGNORE_INDEX = -100  # torch's cross-entropy default: labels never equal to a real id
TASKS: tuple[str, ...] = ("vqa", "caption", "chat", "t2i", "text")
ROLES = ("user", "assistant")

ImageCodes = np.ndarray | torch.Tensor  # (N, G) group indices in [0, 2^g)


class Turn(NamedTuple):
    """One conversation turn; an image (if any) comes before the text in the rendered turn."""

    role: str  # "user" | "assistant"
    text: str = ""
    image_codes: ImageCodes | None = None  # (N, G) group indices


class Sequence(NamedTuple):
    ids: list[int]
    labels: list[int]  # aligned with ids: ids[t] where the loss applies, else IGNORE_INDEX
    task: str


class Batch(NamedTuple):
    ids: torch.Tensor  # (B, T) long, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX on padding
    task_index: torch.Tensor  # (B,) long, index into task_names


class SequenceStats:
    """Counts of samples altered or skipped, by reason ("too_long", "turns_dropped", ...).

    Kept per builder (per data worker) and merged for logging, so truncation is visible instead of
    silent.
    """

    def __init__(self) -> None:
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, reason: str, n: int = 1) -> None:
        self._counts[reason] += n

    def count(self, reason: str) -> int:
        return self._counts[reason]

    def summary(self) -> dict[str, int]:
        return dict(sorted(self._counts.items()))

    def merge(self, other: "SequenceStats") -> "SequenceStats":
        """Add ``other``'s counts into this one (in place); returns self."""
        self._counts.update(other._counts)
        return self

    def __repr__(self) -> str:
        return f"SequenceStats({self.summary()})"


def check_task(task: str, task_names: SequenceLike[str] = TASKS) -> int:
    """Index of ``task`` in ``task_names``; UserError listing the known names otherwise."""
    if task not in task_names:
        raise UserError(f"unknown task {task!r}; known tasks: {', '.join(task_names)}")
    return list(task_names).index(task)


def check_roles(turns: SequenceLike[Turn], last: str) -> None:
    """Roles must alternate user/assistant, start with user and end with ``last``."""
    if not turns:
        raise UserError("a conversation needs at least one turn")
    for i, turn in enumerate(turns):
        expected = ROLES[i % 2]
        if turn.role not in ROLES:
            raise UserError(f"turn {i}: unknown role {turn.role!r}; roles are {', '.join(ROLES)}")
        if turn.role != expected:
            raise UserError(f"turn {i}: expected role {expected!r} (roles alternate user/assistant, "
                            f"starting with user), got {turn.role!r}")
    if turns[-1].role != last:
        raise UserError(f"the last turn must have role {last!r}, got {turns[-1].role!r}")


class _Segment(NamedTuple):
    ids: list[int]
    labels: list[int]


class SequenceBuilder:
    """Renders samples into ``(ids, labels)`` with the templates above, within ``max_length``."""

    def __init__(self, text_tokenizer: TextTokenizer, vocab: Vocab, max_length: int,
                 stats: SequenceStats | None = None):
        if vocab.text_vocab_size != text_tokenizer.vocab_size:
            raise UserError(f"vocab text_vocab_size {vocab.text_vocab_size} does not match the text "
                            f"tokenizer's {text_tokenizer.vocab_size} ({text_tokenizer.model_path})")
        if not isinstance(max_length, int) or max_length <= 0:
            raise UserError(f"max_length must be a positive integer, got {max_length!r}")
        self.text_tokenizer = self.tok = text_tokenizer  # tok: short alias used internally
        self.vocab = vocab
        self.max_length = max_length
        self.stats = stats if stats is not None else SequenceStats()

    # -- pieces ------------------------------------------------------------------------------------
    def image_ids(self, image_codes: ImageCodes) -> list[int]:
        """The tokenizer's codes (N, code_groups) → ``[image ids]`` (N·G,); ValueError on a wrong
        shape or out-of-range values."""
        codes = torch.as_tensor(np.asarray(image_codes) if isinstance(image_codes, np.ndarray)
                                else image_codes)
        expected = (self.vocab.num_patches, self.vocab.code_groups)
        if tuple(codes.shape) != expected:
            raise ValueError(f"image codes must have shape {expected} (patches, groups), "
                             f"got {tuple(codes.shape)}")
        return self.vocab.codes_to_ids(codes).tolist()  # range checked there

    def _image_span(self, image_codes: ImageCodes | None) -> list[int]:
        """``<boi> img <eoi>``, or nothing."""
        if image_codes is None:
            return []
        return [self.tok.boi_id, *self.image_ids(image_codes), self.tok.eoi_id]

    def _encode_text(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"turn text must be str, got {type(text).__name__}")
        return self.tok.encode(text)

    def _user(self, text_ids: list[int], image_codes: ImageCodes | None) -> _Segment:
        """``<user> [<boi> img <eoi>] text``: context only, nothing labelled."""
        ids = [self.tok.user_id, *self._image_span(image_codes), *text_ids]
        return _Segment(ids, [IGNORE_INDEX] * len(ids))

    def _assistant(self, text_ids: list[int], image_codes: ImageCodes | None) -> _Segment:
        """``<assistant> [<boi> img <eoi>] text <eos>``: everything the model produces is labelled
        (``<boi>``, image ids, ``<eoi>``, text, ``<eos>``); ``<assistant>`` is prompt.

        ``<boi>`` is labelled so that a chat model learns to *start* an image when asked for one
        (mixed turns); the text-to-image prompt forces it anyway (:meth:`generation_prompt`).
        """
        span = self._image_span(image_codes)
        if not span and not text_ids:
            raise ValueError("an assistant turn needs text or an image (an empty answer would teach "
                             "the model to stop at once)")
        produced = [*span, *text_ids, self.tok.eos_id]
        ids = [self.tok.assistant_id, *produced]
        labels = [IGNORE_INDEX] + produced
        return _Segment(ids, labels)

    def _turn(self, turn: Turn) -> _Segment:
        text_ids = self._encode_text(turn.text)
        render = self._user if turn.role == "user" else self._assistant
        return render(text_ids, turn.image_codes)

    @staticmethod
    def _join(segments: SequenceLike[_Segment]) -> _Segment:
        ids: list[int] = []
        labels: list[int] = []
        for segment in segments:
            ids += segment.ids
            labels += segment.labels
        return _Segment(ids, labels)

    def _bos(self) -> _Segment:
        return _Segment([self.tok.bos_id], [IGNORE_INDEX])

    # -- training samples --------------------------------------------------------------------------
    def understanding(self, image_codes: ImageCodes | None, question: str, answer: str,
                      task: str = "vqa") -> Sequence | None:
        """VQA / captioning: one user turn (image + question) and the answer."""
        return self.chat([Turn("user", question, image_codes), Turn("assistant", answer)], task=task)

    def chat(self, turns: SequenceLike[Turn], task: str = "chat") -> Sequence | None:
        """Multi-turn conversation (user first, alternating, ending with an assistant turn).

        Trailing user+assistant pairs are dropped until it fits; ``None`` if the first pair does not.
        """
        check_task(task)
        check_roles(turns, last="assistant")
        pairs = [self._join([self._turn(turns[i]), self._turn(turns[i + 1])])
                 for i in range(0, len(turns), 2)]
        keep = len(pairs)
        while keep and 1 + sum(len(p.ids) for p in pairs[:keep]) > self.max_length:
            keep -= 1
        if keep == 0:
            self.stats.add("too_long")
            return None
        if keep < len(pairs):
            self.stats.add("turns_dropped")
        joined = self._join([self._bos(), *pairs[:keep]])
        return Sequence(joined.ids, joined.labels, task)

    def generation(self, caption: str, image_codes: ImageCodes,
                   drop_caption: bool = False) -> Sequence | None:
        """Text-to-image; ``drop_caption`` renders the unconditional sample used for CFG."""
        caption_ids = self._fit_caption("" if drop_caption else caption, count=True)
        if caption_ids is None:
            return None
        joined = self._join([self._bos(), self._user(caption_ids, None),
                             self._assistant([], image_codes)])
        return Sequence(joined.ids, joined.labels, "t2i")

    def text_only(self, text: str) -> Sequence | None:
        """``<bos> text <eos>``, loss on everything after ``<bos>``; cut to max_length if longer."""
        ids = [self.tok.bos_id, *self._encode_text(text), self.tok.eos_id]
        if len(ids) > self.max_length:
            ids = ids[: self.max_length]
            self.stats.add("text_truncated")
        if len(ids) < 2:  # max_length 1: only <bos>, nothing to learn
            self.stats.add("too_long")
            return None
        return Sequence(ids, [IGNORE_INDEX, *ids[1:]], "text")

    def _generation_overhead(self) -> int:
        """Tokens of a generation sample besides the caption:
        ``<bos> <user> <assistant> <boi> img <eoi> <eos>``."""
        return 6 + self.vocab.tokens_per_image

    def _fit_caption(self, caption: str, count: bool) -> list[int] | None:
        """Caption ids cut from the end to fit max_length; None if not even an empty one fits."""
        caption_ids = self._encode_text(caption)
        budget = self.max_length - self._generation_overhead()
        if budget < 0:
            if count:
                self.stats.add("too_long")
            return None
        if len(caption_ids) > budget:
            caption_ids = caption_ids[:budget]
            if count:
                self.stats.add("caption_truncated")
        return caption_ids

    # -- inference prompts (same rendering as training) --------------------------------------------
    def chat_prompt(self, turns: SequenceLike[Turn]) -> list[int]:
        """History ending with a user turn, then ``<assistant>``: what the model continues.

        Not truncated: at inference the caller decides what to drop (usually the oldest turns).
        """
        check_roles(turns, last="user")
        joined = self._join([self._bos(), *(self._turn(t) for t in turns)])
        return [*joined.ids, self.tok.assistant_id]

    def generation_prompt(self, caption: str) -> list[int]:
        """``<bos> <user> {caption} <assistant> <boi>``; caption "" is the unconditional prompt.

        The caption is cut exactly as in training, so the image span still fits in max_length.
        """
        caption_ids = self._fit_caption(caption, count=False)
        if caption_ids is None:
            raise UserError(f"max_length {self.max_length} cannot hold an image "
                            f"({self._generation_overhead()} tokens with an empty caption)")
        user = self._user(caption_ids, None)
        return [self.tok.bos_id, *user.ids, self.tok.assistant_id, self.tok.boi_id]


def collate(sequences: list[Sequence], pad_id: int, task_names: SequenceLike[str] = TASKS) -> Batch:
    """Right-pad to the longest sequence of the batch (see the module docstring for why not pack)."""
    if not sequences:
        raise ValueError("cannot collate an empty batch")
    length = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(sequences):
        if len(seq.ids) != len(seq.labels):
            raise ValueError(f"sequence {row}: {len(seq.ids)} ids but {len(seq.labels)} labels")
        n = len(seq.ids)
        ids[row, :n] = torch.tensor(seq.ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(seq.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    task_index = torch.tensor([check_task(s.task, task_names) for s in sequences], dtype=torch.long)
    return Batch(ids, attention_mask, labels, task_index)
