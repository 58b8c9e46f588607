"""The unified vocabulary: the only place that converts text ids, image codes/bits and unified ids.

Layout (DESIGN.md §3)::

    [0, text_vocab_size)                         text pieces, then our specials (TextTokenizer)
    [image_start + k·2^g, image_start + (k+1)·2^g)  image ids of group k, for k in [0, G)

A patch's L = G·g bits are split into G contiguous groups of g bits (MSB first, the tokenizer's
convention); the patch becomes G consecutive sub-tokens, sub-token k drawn from group k's range.
An image of h×w patches is therefore exactly ``h·w·G`` image ids, in raster order, groups
interleaved per patch: ``p0g0 p0g1 … p0g(G-1) p1g0 …``.

Tiny preset: 12 bits → 2 groups of 6 → 2 × 64 ids, 8×8 patches → 128 ids per image; or, with
``code_group_size`` 6 and ``group_size`` 12, one id of 4,096 per patch → 64 ids per image.
QLIP's 28 bits → 2 × 14 → 2 × 16,384 ids, 16×16 patches → 512 ids per image.

*Codes* are what the QLIP tokenizer reads and writes: per patch, its bits as group indices in the
tokenizer's grouping (``code_group_size`` bits each; the precomputed shards store them so). The
unified model may group the same bits differently (``group_size``): :meth:`Vocab.codes_to_ids`
and :meth:`Vocab.ids_to_codes` regroup through the bits, so nothing outside this file needs to
know which grouping the decoder uses.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from mmcore.errors import UserError
from tokenizer.bsq import bits_to_group_indices, group_indices_to_bits

TEXT = -1  # "group" of a text/special id (see :meth:`Vocab.group_of`)


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Sizes that define the id layout; everything else is derived."""

    text_vocab_size: int  # sentencepiece pieces + specials (TextTokenizer.vocab_size)
    num_groups: int  # G
    group_size: int  # g (bits per group)
    grid_size: int  # patches per side (h = w)
    # bits per group of the tokenizer's codes (what codes_to_ids takes and ids_to_codes returns);
    # 0 at construction means group_size and is stored as that
    code_group_size: int = 0

    def __post_init__(self):
        for name in ("text_vocab_size", "num_groups", "group_size", "grid_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"vocab: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.code_group_size, int) or self.code_group_size < 0:
            raise UserError(f"vocab: code_group_size must be an integer >= 0, got {self.code_group_size!r}")
        if self.code_group_size == 0:  # frozen: one normal form, so equal layouts compare equal
            object.__setattr__(self, "code_group_size", self.group_size)
        if self.num_bits % self.code_group_size:
            raise UserError(f"vocab: {self.num_bits} bits do not split into the tokenizer's groups of "
                            f"{self.code_group_size}")
        if self.group_size > 20:
            raise UserError(f"vocab: group_size {self.group_size} gives {2 ** self.group_size} ids per "
                            "group; use more groups of fewer bits (QLIP: 28 bits = 2 x 14)")

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def image_start(self) -> int:
        return self.text_vocab_size

    @property
    def group_vocab(self) -> int:
        """Ids per group (2^g)."""
        return 1 << self.group_size

    @property
    def size(self) -> int:
        """Total unified vocabulary (the decoder's embedding rows)."""
        return self.image_start + self.num_groups * self.group_vocab

    @property
    def num_bits(self) -> int:
        return self.num_groups * self.group_size

    @property
    def code_groups(self) -> int:
        """Groups per patch in the tokenizer's codes: a code array is (..., N, code_groups)."""
        return self.num_bits // self.code_group_size

    @property
    def regroups(self) -> bool:
        return self.code_group_size != self.group_size

    @property
    def num_patches(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def tokens_per_image(self) -> int:
        """Image ids between ``<boi>`` and ``<eoi>``: h·w·G."""
        return self.num_patches * self.num_groups

    def group_range(self, group: int) -> tuple[int, int]:
        """[start, end) of group ``group``'s ids."""
        if not 0 <= group < self.num_groups:
            raise ValueError(f"group {group} out of range [0, {self.num_groups})")
        start = self.image_start + group * self.group_vocab
        return start, start + self.group_vocab

    def span_group(self, offset: int) -> int:
        """Group of the ``offset``-th id inside an image span (0-based, after ``<boi>``)."""
        return offset % self.num_groups

    # -- classification ----------------------------------------------------------------------------
    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.image_start) & (ids < self.size)

    def is_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Text pieces and specials (everything before the image ranges)."""
        return (ids >= 0) & (ids < self.image_start)

    def group_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Group index of image ids; :data:`TEXT` (-1) for text/special ids."""
        group = torch.div(ids - self.image_start, self.group_vocab, rounding_mode="floor")
        return torch.where(self.is_image(ids), group, torch.full_like(ids, TEXT))

    # -- conversions ---------------------------------------------------------------------------------
    def codes_to_ids(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The tokenizer's group indices ``(..., N, code_groups)`` → unified ids ``(..., N·G)``."""
        codes = torch.as_tensor(np.asarray(codes) if isinstance(codes, np.ndarray) else codes).long()
        if codes.shape[-1] != self.code_groups or codes.dim() < 2:
            raise ValueError(f"image codes must have shape (..., N, {self.code_groups}), got {tuple(codes.shape)}")
        limit = 1 << self.code_group_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= limit):
            raise ValueError(f"image codes must lie in [0, {limit}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        if self.regroups:  # (..., N, code_groups) -> bits (..., N, L) -> (..., N, G)
            codes = bits_to_group_indices(group_indices_to_bits(codes, self.code_group_size), self.group_size)
        return self.group_indices_to_ids(codes)

    def group_indices_to_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices in the decoder's *own* groups ``(..., N, G)`` in [0, 2^g) (what the sampler draws
        from each group's range) → unified ids ``(..., N·G)``; no regrouping, no range check."""
        offsets = self.image_start + self.group_vocab * torch.arange(self.num_groups, device=indices.device)
        ids = indices + offsets  # (..., N, G): group k shifted into its own range
        return ids.flatten(-2)  # (..., N·G), groups interleaved per patch

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Unified ids ``(..., N·G)`` → the tokenizer's group indices ``(..., N, code_groups)``; every
        id must be an image id of the group its position asks for, otherwise ValueError (names the
        first bad position)."""
        ids = torch.as_tensor(ids).long()
        if ids.shape[-1] % self.num_groups:
            raise ValueError(f"{ids.shape[-1]} image ids is not a multiple of {self.num_groups} groups")
        grouped = ids.unflatten(-1, (-1, self.num_groups))  # (..., N, G)
        offsets = self.image_start + self.group_vocab * torch.arange(self.num_groups)
        codes = grouped - offsets
        bad = (codes < 0) | (codes >= self.group_vocab)
        if bad.any():
            flat = int(bad.flatten(-2).nonzero()[0, -1])
            raise ValueError(f"id at image offset {flat} is not an id of group {self.span_group(flat)}: "
                             f"{int(ids.flatten()[bad.flatten().nonzero()[0, 0]])}")
        if self.regroups:  # (..., N, G) -> bits -> (..., N, code_groups)
            codes = bits_to_group_indices(group_indices_to_bits(codes, self.group_size), self.code_group_size)
        return codes

    def bits_to_ids(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits ``(..., N, L)`` in {0, 1} → unified ids ``(..., N·G)``."""
        if bits.shape[-1] != self.num_bits:
            raise ValueError(f"expected {self.num_bits} bits per patch, got {bits.shape[-1]}")
        return self.codes_to_ids(bits_to_group_indices(bits, self.code_group_size))

    def ids_to_bits(self, ids: torch.Tensor) -> torch.Tensor:
        """Unified ids ``(..., N·G)`` → bits ``(..., N, L)`` in {0, 1}."""
        return group_indices_to_bits(self.ids_to_codes(ids), self.code_group_size)

    def code_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes of one group ``(...)`` in [0, 2^g) → their g bits ``(..., g)`` in {0, 1}, MSB first."""
        return group_indices_to_bits(torch.as_tensor(codes).long().unsqueeze(-1), self.group_size)

    # -- masks for the modality-separated softmax ----------------------------------------------------
    def allowed_mask(self, group: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``(size,)``: the ids a position may score/sample; ``group`` = :data:`TEXT` for text
        positions (text pieces and specials), else an image group."""
        mask = torch.zeros(self.size, dtype=torch.bool, device=device)
        if group == TEXT:
            mask[: self.image_start] = True
        else:
            start, end = self.group_range(group)
            mask[start:end] = True
        return mask

    # -- (de)serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "vocab") -> "Vocab":
        fields = {f.name for f in dataclasses.fields(cls)}
        # code_group_size may be absent: exports written before it existed used group_size
        if not isinstance(data, dict) or not fields - {"code_group_size"} <= set(data) <= fields:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise UserError(f"{source}: expected keys {sorted(fields)}, got {got}")
        return cls(**data)

    @classmethod
    def for_tokenizers(cls, text_vocab_size: int, num_bits: int, group_size: int, grid_size: int,
                       image_group_size: int = 0) -> "Vocab":
        """The vocabulary for a text tokenizer and a QLIP tokenizer's BSQ layout (``group_size``:
        the tokenizer's bits per group). ``image_group_size``: bits per image id of the unified
        model (0: the tokenizer's; ``num_bits``: one id per patch)."""
        if num_bits % group_size:
            raise UserError(f"vocab: {num_bits} bits do not split into groups of {group_size}")
        ids_bits = image_group_size or group_size
        if num_bits % ids_bits:
            raise UserError(f"vocab: image_group_size {ids_bits} does not divide the tokenizer's {num_bits} bits")
        return cls(text_vocab_size, num_bits // ids_bits, ids_bits, grid_size, code_group_size=group_size)
