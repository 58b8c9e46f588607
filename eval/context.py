"""What the evaluators share: the loaded models (lazily, once), ShapesWorld samples with their
codes, and real images encoded by the model's bundled QLIP tokenizer.

Which tokenizer a task uses:

* ``reconstruction``: the model's bundled QLIP (what text-to-image decodes through) when
  ``--model`` is given, else ``--tokenizer``;
* ``zero_shot``: ``--tokenizer`` when given (it needs a text tower: a stage-1 export), else the
  bundled QLIP.
"""
from __future__ import annotations

import argparse
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import Hashable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mmcore.errors import UserError
from tokenizer.export import LoadedTokenizer, load_tokenizer
from tokenizer.images import encode_images, image_to_pixels
from unified_mm.data.converters import resize_center_crop
from unified_mm.data.shapesworld import ShapesWorldConfig
from unified_mm.export import LoadedUnified, load_qlip, load_unified
from unified_mm.sequence import SequenceBuilder
from unified_mm.tokenizer_cli import read_precomputed

from eval.metrics.geneval import world_config


# the tasks that read ShapesWorld samples with the model's codes (Context.shapesworld)
SHAPESWORLD_TASKS = ("vqa", "caption", "t2i")


class SWSample(NamedTuple):
    key: str
    codes: np.ndarray     # (N, G) group indices of the model's bundled tokenizer
    meta: dict


class Context:
    """Resources of one evaluation run; everything is loaded on first use."""

    def __init__(self, args: argparse.Namespace, out: Path, tasks: Sequence[str] | None = None):
        self.args, self.out = args, out
        self.tasks = list(tasks) if tasks is not None else None  # None: any task may run
        self.progress = not args.quiet
        self._file_codes: dict[Path, np.ndarray] = {}

    # -- models -----------------------------------------------------------------------------------
    @cached_property
    def unified(self) -> LoadedUnified:
        if self.args.model is None:
            raise UserError("this task needs --model (a unified model export)")
        return load_unified(self.args.model, device=self.args.device)

    @cached_property
    def qlip(self) -> LoadedTokenizer:
        """The model's bundled QLIP tokenizer (its codes are the model's image ids)."""
        return load_qlip(self.unified, device=self.args.device)

    @cached_property
    def standalone_tokenizer(self) -> LoadedTokenizer | None:
        return load_tokenizer(self.args.tokenizer, self.args.device) if self.args.tokenizer else None

    def recon_tokenizer(self) -> tuple[LoadedTokenizer, str]:
        if self.args.model is not None:
            return self.qlip, "bundled with --model"
        return self.standalone_tokenizer, "--tokenizer"

    def zero_shot_tokenizer(self) -> tuple[LoadedTokenizer, str]:
        if self.args.tokenizer is not None:
            return self.standalone_tokenizer, "--tokenizer"
        return self.qlip, "bundled with --model"

    @cached_property
    def builder(self) -> SequenceBuilder:
        loaded = self.unified
        return SequenceBuilder(loaded.text_tokenizer, loaded.vocab,
                               max_length=int(loaded.model.config.max_position_embeddings))

    @property
    def model_id(self) -> str:
        """Answer files are tied to the model by its export hash."""
        return self.unified.hash

    def limit(self, task: str) -> int | None:
        """How many samples of its source ``task`` reads: its ``--task-limit``, else ``--limit``."""
        limits = getattr(self.args, "task_limits", {})
        return limits[task] if task in limits else self.args.limit

    # -- ShapesWorld --------------------------------------------------------------------------------
    @cached_property
    def world(self) -> ShapesWorldConfig:
        source = self.args.data or self.args.codes
        return world_config(source) if source else ShapesWorldConfig()

    def shapesworld_for(self, task: str) -> list[SWSample]:
        """The first ``limit(task)`` samples of ``--split`` with their codes."""
        return self.shapesworld[:self.limit(task)]

    @cached_property
    def shapesworld(self) -> list[SWSample]:
        """The samples of ``--split`` that this run's model tasks read (the most any of them asks
        for), with their codes: read from ``--codes`` (checked against the model's tokenizer hash)
        or encoded from ``--data`` shards."""
        args = self.args
        wanted = [self.limit(task) for task in SHAPESWORLD_TASKS if self.tasks is None or task in self.tasks]
        if not wanted:  # no ShapesWorld task selected (a direct call): the plain --limit
            limit = args.limit
        else:
            limit = None if None in wanted else max(wanted)  # None: a task reads the whole split
        if args.codes:
            reader = read_precomputed(args.codes, args.split, expected_hash=self.unified.tokenizer_hash,
                                      split_by_rank=False)
            samples = [SWSample(key, codes, meta) for key, codes, meta in
                       tqdm(islice(reader, limit), desc=f"read codes ({args.split})", unit="img",
                            disable=not self.progress)]
        else:
            from unified_mm.data.shards import ShardDataset, resolve_shards

            dataset = ShardDataset(resolve_shards(args.data, args.split), split_by_rank=False)
            raw = list(islice(dataset, limit))
            size = self.qlip.model.config.encoder.image_size
            for sample in raw[:1]:
                if sample.image.size != (size, size):
                    raise UserError(f"{sample.shard}: images are {sample.image.size[0]}x{sample.image.size[1]}, "
                                    f"the model's tokenizer takes {size}x{size}")
            codes = self._encode([image_to_pixels(s.image) for s in raw], f"encode {args.split}")
            samples = [SWSample(s.key, c, s.meta) for s, c in zip(raw, codes)]
        if not samples:
            raise UserError(f"split {args.split!r} has no samples in {args.codes or args.data}")
        return samples

    @cached_property
    def _sw_index(self) -> dict[str, np.ndarray]:
        return {sample.key: sample.codes for sample in self.shapesworld}

    # -- images by path ---------------------------------------------------------------------------
    def _encode(self, pixels: Sequence[torch.Tensor], desc: str) -> list[np.ndarray]:
        model, out = self.qlip.model, []
        batch = self.args.batch_size
        for start in tqdm(range(0, len(pixels), batch), desc=desc, unit="batch", disable=not self.progress
                          or len(pixels) <= batch):
            _, groups = encode_images(model, torch.stack(list(pixels[start:start + batch])), batch)
            out += [g.numpy() for g in groups]
        return out

    def _load_file(self, path: Path) -> torch.Tensor:
        size = self.qlip.model.config.encoder.image_size
        try:
            with Image.open(path) as img:
                img.load()
                image = resize_center_crop(img, size)
        except FileNotFoundError:
            raise UserError(f"image not found: {path}") from None
        except UnidentifiedImageError:
            raise UserError(f"{path} is not an image (PIL cannot identify its format)") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise UserError(f"{path}: unreadable image: {err}") from None
        return image_to_pixels(image)

    def image_codes(self, images: Sequence[Hashable | None]) -> list[np.ndarray | None]:
        """Codes (N, G) for each image: a ShapesWorld key, an image path (loaded, resized and
        centre-cropped to the tokenizer's size, encoded once per run) or None (no image)."""
        new = list(dict.fromkeys(p for p in images if isinstance(p, Path) and p not in self._file_codes))
        if new:
            codes = self._encode([self._load_file(p) for p in new], "encode images")
            self._file_codes.update(zip(new, codes))
        out = []
        for image in images:
            if image is None:
                out.append(None)
            elif isinstance(image, Path):
                out.append(self._file_codes[image])
            else:
                out.append(self._sw_index[image])
        return out
