"""Image–text batches for QLIP tokenizer training, streamed from webdataset shards.

Each rank reads its own part of the shards (:class:`unified_mm.data.shards.ShardDataset`), picks
one caption per image, tokenizes it as ``<bos> text <eos>`` (right-padded, pooled at ``<eos>``)
and attaches a *positive label*: two samples with equal labels describe each other, so the CLIP
loss treats them as positives rather than negatives (a batch of ShapesWorld images holds many
"a red circle"s). The stream is deterministic in (seed, rank, position): resuming at a saved
position replays exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import random
from itertools import islice
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from mmcore.config import ConfigError
from mmcore.text_tokenizer import TextTokenizer
from unified_mm.data.hard_negatives import SWAPPABLE, hard_negative
from unified_mm.data.pixels import image_to_pixels
from unified_mm.data.shapesworld import ShapesWorldConfig
from unified_mm.data.shards import Sample, ShardDataset, SkipLog, resolve_shards
from unified_mm.tokenizer_eval import data_config


@dataclasses.dataclass
class TokenizerDataConfig:
    data: str = "data/shapesworld"  # dataset directory or shard pattern
    split: str = "train"
    val_split: str = "val"
    text_tokenizer: str = "runs/text_tokenizer.model"  # sentencepiece model (stage 1)
    shuffle_buffer: int = 2000
    # probability of using captions[i] (ShapesWorld: short, long with size+position, sentence)
    caption_weights: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.5, 0.0])
    # extra captions per image, each the image's own caption kind with one object's colour or shape
    # changed, scored as negatives for that batch's images (unified_mm/data/hard_negatives.py;
    # needs ShapesWorld metadata; 0 = QLIP's plain in-batch negatives)
    hard_negatives: int = 0
    # which attribute a hard negative changes: attribute ("colour", "shape") -> weight; {} = every
    # alternative value equally likely (6 colours, 4 shapes: 5 of 8 negatives change a colour)
    hard_negative_weights: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.hard_negatives < 0:
            raise ConfigError(f"data.hard_negatives must be >= 0, got {self.hard_negatives}")
        unknown = sorted(set(self.hard_negative_weights) - set(SWAPPABLE))
        if unknown:
            raise ConfigError(f"data.hard_negative_weights: unknown attributes {unknown}; known: {', '.join(SWAPPABLE)}")
        values = list(self.hard_negative_weights.values())
        if values and (not all(isinstance(v, (int, float)) and v >= 0 for v in values) or sum(values) <= 0):
            raise ConfigError(f"data.hard_negative_weights must be non-negative numbers with a positive sum, "
                              f"got {self.hard_negative_weights}")
        if not self.caption_weights or min(self.caption_weights) < 0 or sum(self.caption_weights) <= 0:
            raise ConfigError(f"data.caption_weights must be non-negative with a positive sum, "
                              f"got {self.caption_weights}")


class ImageTextBatch(NamedTuple):
    pixels: torch.Tensor  # (B, 3, H, W) float32 in [-1, 1]
    text_ids: torch.Tensor  # (B, T) int64, right-padded
    attention_mask: torch.Tensor  # (B, T) int64, 1 on real tokens
    labels: list[str]  # positive label per sample (equal labels = mutual positives)
    keys: list[str]
    end_position: int  # samples of this rank's stream consumed once this batch is done (resume point)
    negative_ids: torch.Tensor | None = None  # (N, T) int64 hard-negative captions, right-padded
    negative_mask: torch.Tensor | None = None  # (N, T) int64
    negative_labels: list[str] | None = None  # what each negative asserts (a positive where true)


def caption_label(meta: dict, index: int, caption: str) -> str:
    """What a caption asserts, canonicalised, so equal labels mean "describes the same scene".

    ShapesWorld captions: index 0 names colour+shape of each object; 1 and 2 also size and
    position. Object order in the text does not matter, so the label is the sorted attribute list.
    Other datasets fall back to the caption text itself.
    """
    objects = meta.get("objects")
    if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
        return caption
    fields = ("colour", "shape") if index == 0 else ("size", "colour", "shape", "position")
    try:
        described = sorted(" ".join(str(o[f]) for f in fields) for o in objects)
    except KeyError:
        return caption
    return f"{index == 0}|" + ";".join(described)


def _caption_list(meta: dict) -> list:
    captions = meta.get("captions")
    if not captions and isinstance(meta.get("caption"), str):
        captions = [meta["caption"]]
    return captions if isinstance(captions, list) else []


def _usable(caption) -> bool:
    return isinstance(caption, str) and bool(caption.strip())


def has_caption(meta: dict) -> bool:
    """Whether :func:`pick_caption` finds a caption (a non-empty string) in ``meta``."""
    return any(_usable(c) for c in _caption_list(meta))


def pick_caption(meta: dict, weights: list[float], rng: random.Random) -> tuple[int, str] | None:
    """(index, caption) drawn by ``weights``; None when ``meta`` has no usable (non-empty string)
    caption. Malformed ``captions`` fields (not a list, non-string entries) count as missing."""
    captions = _caption_list(meta)
    if not has_caption(meta):
        return None
    usable = [(i, w) for i, w in enumerate(weights[: len(captions)]) if w > 0 and _usable(captions[i])]
    if not usable:
        usable = [(next(i for i, c in enumerate(captions) if _usable(c)), 1.0)]
    index = rng.choices([i for i, _ in usable], [w for _, w in usable])[0]
    return index, captions[index]


def pad_rows(rows: list[list[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, T) ids and (N, T) mask (T = the longest row unless given)."""
    length = length or max(len(ids) for ids in rows)
    text_ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for row, ids in enumerate(rows):
        text_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        mask[row, : len(ids)] = 1
    return text_ids, mask


def collate(samples: list[tuple[Sample, list[int], str]], pad_id: int, end_position: int,
            negatives: list[tuple[list[int], str]] | None = None) -> ImageTextBatch:
    """One batch; ``negatives`` (ids, label) become extra caption rows padded to the captions'
    length (an empty list gives (0, T) tensors: every rank must join the loss's collectives)."""
    length = max(len(ids) for ids in [*(ids for _, ids, _ in samples), *(ids for ids, _ in negatives or [])])
    text_ids, mask = pad_rows([ids for _, ids, _ in samples], pad_id, length)
    pixels = torch.stack([image_to_pixels(sample.image) for sample, _, _ in samples])
    batch = ImageTextBatch(pixels, text_ids, mask, [label for _, _, label in samples],
                           [sample.key for sample, _, _ in samples], end_position)
    if negatives is not None:
        negative_ids, negative_mask = pad_rows([ids for ids, _ in negatives], pad_id, length)
        batch = batch._replace(negative_ids=negative_ids, negative_mask=negative_mask,
                               negative_labels=[label for _, label in negatives])
    return batch


def with_negatives(batch: ImageTextBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B + N, T) caption ids and mask: the batch's captions, then its hard negatives (if any),
    so one text-tower forward embeds both."""
    if batch.negative_ids is None:
        return batch.text_ids, batch.attention_mask
    return (torch.cat([batch.text_ids, batch.negative_ids]), torch.cat([batch.attention_mask, batch.negative_mask]))


def swap_choices(data: str) -> dict[str, list[str]]:
    """The colour and shape names a hard negative may swap in: the dataset's own (its saved
    ShapesWorld config.yaml), else ShapesWorld's defaults."""
    world = data_config(data) if Path(str(data)).is_dir() else ShapesWorldConfig()
    return {"colour": list(world.colours), "shape": list(world.shapes)}


def image_text_batches(cfg: TokenizerDataConfig, text_tokenizer: TextTokenizer | None, batch_size: int,
                       context_length: int, image_size: int, *, seed: int, rank: int, start: int = 0,
                       skip_log: SkipLog | None = None) -> Iterator[ImageTextBatch]:
    """Endless batches for this rank, starting after ``start`` samples of its stream.

    Without a text tokenizer (stage 2) batches carry empty text. Samples without any caption are
    skipped and counted (stage 1 needs one per image).
    """
    skip_log = skip_log or SkipLog()
    dataset = ShardDataset(resolve_shards(cfg.data, cfg.split), shuffle_buffer=cfg.shuffle_buffer,
                           seed=seed, repeat=True, image_size=image_size, skip_log=skip_log)
    pad_id = text_tokenizer.pad_id if text_tokenizer is not None else 0
    use_negatives = text_tokenizer is not None and cfg.hard_negatives > 0
    choices = swap_choices(cfg.data) if use_negatives else {}
    buffer, negatives = [], []
    samples = iter(dataset)
    for sample in islice(samples, start):  # resuming: the replayed samples count their skips again
        if text_tokenizer is not None and not has_caption(sample.meta):
            skip_log.skip(sample.shard, sample.key, "no caption: stage 1 needs one per image")
    for position, sample in enumerate(samples, start=start):
        rng = random.Random(f"caption/{seed}/{rank}/{position}")
        ids, label = [], sample.key
        if text_tokenizer is not None:
            picked = pick_caption(sample.meta, cfg.caption_weights, rng)
            if picked is None:
                skip_log.skip(sample.shard, sample.key, "no caption: stage 1 needs one per image")
                continue
            index, caption = picked
            ids = text_tokenizer.encode_pooled(caption, context_length)
            label = caption_label(sample.meta, index, caption)
            if use_negatives:
                for _ in range(cfg.hard_negatives):
                    negative = hard_negative(sample.meta, index, rng, choices, cfg.hard_negative_weights)
                    if negative is not None:
                        negatives.append((text_tokenizer.encode_pooled(negative.caption, context_length),
                                          caption_label({"objects": negative.objects}, index, negative.caption)))
        buffer.append((sample, ids, label))
        if len(buffer) == batch_size:
            yield collate(buffer, pad_id, position + 1, negatives if use_negatives else None)
            buffer, negatives = [], []
