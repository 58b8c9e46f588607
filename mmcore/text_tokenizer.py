"""Text tokenizer: a sentencepiece model plus the project's special tokens.

Layout of the ids this wrapper hands out (DESIGN.md §3)::

    [0, n_text)                      sentencepiece pieces (any .model: ours or a Llama tokenizer.model)
    [n_text, n_text + len(SPECIALS)) our special tokens, in SPECIALS order

Specials are always appended after the sentencepiece vocabulary, even when the model defines its
own ``<s>``/``</s>``, so the layout is the same for every model; image ids (``unified_mm.vocab``)
start at :attr:`TextTokenizer.vocab_size`.

sentencepiece is loaded directly: ``transformers.LlamaTokenizer(vocab_file=...)`` can silently build
an empty tokenizer (ENV-NOTES), and we need nothing from it.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from mmcore.errors import UserError
from mmcore.io import atomic_write_bytes

# Order is part of the id layout: append new specials at the end only.
SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<user>", "<assistant>")


class TextTokenizer:
    """Encode/decode text with a sentencepiece model; exposes the special-token ids."""

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise UserError(f"sentencepiece model not found: {self.model_path}")
        data = self.model_path.read_bytes()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as err:
            raise UserError(f"{self.model_path} is not a valid sentencepiece model: {err}") from None
        if self.sp.get_piece_size() == 0:
            raise UserError(f"{self.model_path}: sentencepiece model has an empty vocabulary")
        self.fingerprint = hashlib.sha256(data).hexdigest()[:16]
        self.n_text = self.sp.get_piece_size()
        self.special_ids = {name: self.n_text + i for i, name in enumerate(SPECIALS)}

    # -- sizes and ids ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Text pieces + specials (image ids, when used, start here)."""
        return self.n_text + len(SPECIALS)

    def special(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise UserError(f"unknown special token {name!r}; known: {', '.join(SPECIALS)}") from None

    pad_id = property(lambda self: self.special_ids["<pad>"])
    bos_id = property(lambda self: self.special_ids["<bos>"])
    eos_id = property(lambda self: self.special_ids["<eos>"])
    boi_id = property(lambda self: self.special_ids["<boi>"])
    eoi_id = property(lambda self: self.special_ids["<eoi>"])
    user_id = property(lambda self: self.special_ids["<user>"])
    assistant_id = property(lambda self: self.special_ids["<assistant>"])

    def is_special(self, token_id: int) -> bool:
        return self.n_text <= token_id < self.vocab_size

    # -- text ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> sentencepiece ids (no specials added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(self.sp.encode(text))

    def encode_pooled(self, text: str, context_length: int) -> list[int]:
        """``<bos> text <eos>`` within ``context_length``: the text tower's input layout.

        Text is cut *before* ``<eos>`` so the token the tower pools at is always ``<eos>``.
        """
        return [self.bos_id, *self.encode(text)[: context_length - 2], self.eos_id]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids -> text. Specials are dropped, or rendered by name when ``skip_special=False``;
        ids beyond the text+special range (e.g. image ids) raise, since they are not text."""
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if 0 <= token_id < self.n_text:
                run.append(token_id)
                continue
            if not self.is_special(token_id):
                raise ValueError(f"id {token_id} is not a text or special id (vocab {self.vocab_size})")
            if run:
                pieces.append(self.sp.decode(run))
                run = []
            if not skip_special:
                pieces.append(SPECIALS[token_id - self.n_text])
        if run:
            pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.model_path}, n_text={self.n_text}, specials={len(SPECIALS)})"


def train_sentencepiece(texts: Iterable[str], out_path: str | Path, vocab_size: int = 512,
                        model_type: str = "bpe", character_coverage: float = 1.0) -> Path:
    """Train a sentencepiece model on ``texts`` and write it atomically to ``out_path``.

    Byte fallback keeps every string encodable (unknown characters become byte pieces), and the
    identity normaliser keeps ``decode(encode(s)) == s`` for the dataset's text. sentencepiece's own
    bos/eos/pad are disabled: :data:`SPECIALS` provides them.
    ``vocab_size`` is an upper bound (small corpora have fewer distinct pieces).
    """
    texts = [t for t in texts if t]
    if not texts:
        raise UserError("cannot train a text tokenizer on an empty corpus")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        hard_vocab_limit=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        split_digits=True, num_threads=1, minloglevel=2,
    )
    return atomic_write_bytes(Path(out_path), model.getvalue())
