"""Reading webdataset shards (``.png``/``.jpg`` + ``.json`` per sample), shared by every stage.

What this adds on top of ``webdataset``'s tar iteration:

* **Rank/worker splitting that never starves a reader.** With at least as many shards as readers
  (ranks × DataLoader workers) each reader takes whole shards; with fewer, every reader walks all
  shards and keeps every n-th sample, so tiny datasets still train on 2 processes.
* **Deterministic shuffling** from ``(seed, epoch, reader)``: shard order per epoch and a sample
  buffer, so a resumed run sees the same stream.
* **Bad samples are skipped, counted and named**: an unreadable image, invalid JSON, a sample with a
  part missing, a truncated tar or a missing shard logs one warning naming the shard and key and
  increments a per-reason counter (:class:`SkipLog`); it never stops a training run.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import os
import random
from itertools import count, islice
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mmcore.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class Sample(NamedTuple):
    key: str
    shard: str
    image: Image.Image | None  # RGB; None when read with decode_image=False
    meta: dict
    extras: dict  # any other parts of the sample, undecoded bytes by extension (e.g. "codes.npy")


class SkipLog:
    """Per-reason counts of skipped samples; each skip is logged once, naming shard and key.

    ``read`` counts the raw samples the readers sharing this log looked at (good and bad), so
    ``total / read`` is the skipped fraction (the trainers stop above ``max_skip_fraction``).
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.read = 0

    def skip(self, shard: str, key: str | None, reason: str) -> None:
        self.counts[reason.split(":")[0]] += 1
        where = f"{shard}" + (f" key {key}" if key else "")
        log.warning("skipped sample (%s): %s [%d skipped so far]", where, reason, self.total)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def fraction(self) -> float:
        """Skipped / read (0 before anything was read)."""
        return self.total / self.read if self.read else 0.0

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


# ---------------------------------------------------------------------------------------------
# Shard lists
# ---------------------------------------------------------------------------------------------

def resolve_shards(spec: str | Path | Sequence[str | Path], split: str | None = None) -> list[str]:
    """Turn a directory, a ``.tar`` path, a brace pattern or a list of those into shard paths.

    A directory yields its ``{split}-*.tar`` files (all ``*.tar`` when ``split`` is None), sorted.
    """
    if isinstance(spec, (list, tuple)):
        return [shard for item in spec for shard in resolve_shards(item, split)]
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        pattern = f"{split}-*.tar" if split else "*.tar"
        shards = sorted(str(p) for p in path.glob(pattern))
        if not shards:
            raise UserError(f"no shards matching {pattern!r} in {path}")
        return shards
    if "{" in text:
        shards = list(wds.shardlists.expand_urls(text))
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise UserError(f"shard not found: {missing[0]} (from pattern {text!r})")
        return shards
    if path.is_file():
        return [text]
    raise UserError(f"shard path not found: {text}")


def reader_plan(num_shards: int, reader: int, num_readers: int) -> tuple[slice, int, int]:
    """How reader ``reader`` of ``num_readers`` splits the data: (shard slice, sample offset, stride)."""
    if num_shards >= num_readers:
        return slice(reader, None, num_readers), 0, 1
    return slice(None), reader, num_readers


def _reader_identity(split_by_rank: bool = True) -> tuple[int, int]:
    """(this reader's index, number of readers) over distributed ranks × DataLoader workers."""
    rank, world_size, _, _ = wds.utils.pytorch_worker_info() if split_by_rank else (0, 1, 0, 1)
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * num_workers + worker, world_size * num_workers


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def decode_sample(raw: dict, skip_log: SkipLog, image_size: int | None = None,
                  decode_image: bool = True) -> Sample | None:
    """Decode one raw webdataset sample; None (and a counted warning) when it is unusable.

    ``decode_image=False`` neither needs nor decodes the image part (``Sample.image`` is None):
    readers of precomputed codes only want the json and the codes, and skip PNG decoding.
    """
    shard, key = raw.get("__url__", "?"), raw.get("__key__")
    if not decode_image:
        return _decode_meta_only(raw, shard, key, skip_log)
    image_ext = next((ext for ext in IMAGE_EXTS if ext in raw), None)
    if image_ext is None or "json" not in raw:
        parts = sorted(k for k in raw if not k.startswith("__"))
        skip_log.skip(shard, key, f"missing part: has {parts}, needs an image and json")
        return None
    try:
        with Image.open(io.BytesIO(raw[image_ext])) as img:
            img.load()
            image = img.convert("RGB")
    except Exception as err:  # PIL raises many types for bad bytes
        skip_log.skip(shard, key, f"unreadable image: {type(err).__name__}: {err}")
        return None
    if image_size is not None and image.size != (image_size, image_size):
        skip_log.skip(shard, key, f"wrong image size: {image.size[0]}x{image.size[1]}, "
                                  f"expected {image_size}x{image_size}")
        return None
    meta = _decode_json(raw, shard, key, skip_log)
    if meta is None:
        return None
    extras = {k: v for k, v in raw.items() if not k.startswith("__") and k not in (image_ext, "json")}
    return Sample(key=key, shard=shard, image=image, meta=meta, extras=extras)


def _decode_json(raw: dict, shard: str, key: str | None, skip_log: SkipLog) -> dict | None:
    try:
        text = raw["json"].decode("utf-8")
        meta = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        skip_log.skip(shard, key, f"bad json: {err}")
        return None
    except RecursionError:  # absurdly deep nesting ("[[[[..."): a hostile or corrupt file
        skip_log.skip(shard, key, "bad json: nested too deeply")
        return None
    if not isinstance(meta, dict):
        skip_log.skip(shard, key, f"bad json: top level is {type(meta).__name__}, expected an object")
        return None
    if "\\ud" in text.lower():  # an escaped surrogate: valid JSON, but unpaired it is not text
        try:
            json.dumps(meta, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            skip_log.skip(shard, key, "bad json: invalid unicode (an unpaired surrogate escape)")
            return None
    return meta


def _decode_meta_only(raw: dict, shard: str, key: str | None, skip_log: SkipLog) -> Sample | None:
    if "json" not in raw:
        parts = sorted(k for k in raw if not k.startswith("__"))
        skip_log.skip(shard, key, f"missing part: has {parts}, needs json")
        return None
    meta = _decode_json(raw, shard, key, skip_log)
    if meta is None:
        return None
    extras = {k: v for k, v in raw.items()
              if not k.startswith("__") and k != "json" and k not in IMAGE_EXTS}
    return Sample(key=key, shard=shard, image=None, meta=meta, extras=extras)


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------

def tar_has_end_marker(path: str) -> bool:
    """Whether a local tar ends with its end-of-archive blocks (two zero 512-byte blocks).

    Python's streaming tar reader stops *silently* at a truncated header, so a cut shard would
    look like a short one; this cheap check makes the truncation visible. Non-local URLs pass.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            if size < 1024 or size % 512:
                return False
            handle.seek(size - 1024)
            return handle.read(1024) == bytes(1024)
    except OSError:
        return True  # not a local file (or gone): webdataset's opener reports it


class ShardDataset(IterableDataset):
    """Iterable over decoded :class:`Sample` s of a shard set, split across ranks and workers.

    ``repeat=True`` cycles epochs forever (epoch numbers continue from ``epoch``), which is what
    step-based training wants; ``shuffle_buffer=0`` keeps file order (evaluation).
    ``split_by_rank=False`` gives this process every sample even inside a distributed job (e.g.
    rank 0 evaluating alone); DataLoader workers still split among themselves.
    """

    def __init__(self, shards: Sequence[str], *, shuffle_buffer: int = 0, seed: int = 0, epoch: int = 0,
                 repeat: bool = False, image_size: int | None = None, skip_log: SkipLog | None = None,
                 split_by_rank: bool = True, decode_image: bool = True):
        super().__init__()
        if not shards:
            raise UserError("ShardDataset needs at least one shard")
        self.shards = list(shards)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch
        self.repeat = repeat
        self.image_size = image_size
        self.skip_log = skip_log or SkipLog()
        self.split_by_rank = split_by_rank
        self.decode_image = decode_image

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Sample]:
        reader, num_readers = _reader_identity(self.split_by_rank)
        epochs = count(self.epoch) if self.repeat else [self.epoch]
        for epoch in epochs:
            yield from self._iter_epoch(epoch, reader, num_readers)

    def _iter_epoch(self, epoch: int, reader: int, num_readers: int) -> Iterator[Sample]:
        order = list(self.shards)
        if self.shuffle_buffer > 0:
            random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        shard_slice, offset, stride = reader_plan(len(order), reader, num_readers)
        raw_samples = self._raw_samples(order[shard_slice])
        if stride > 1:
            raw_samples = islice(raw_samples, offset, None, stride)
        samples = (decode_sample(raw, self.skip_log, self.image_size, self.decode_image)
                   for raw in self._counted(raw_samples))
        samples = (s for s in samples if s is not None)
        if self.shuffle_buffer > 0:
            rng = random.Random(f"samples/{self.seed}/{epoch}/{reader}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        yield from samples

    def _counted(self, raw_samples: Iterable[dict]) -> Iterator[dict]:
        for raw in raw_samples:
            self.skip_log.read += 1
            yield raw

    def _raw_samples(self, shards: Iterable[str]) -> Iterator[dict]:
        """webdataset's tar expansion, with errors counted against the shard being read."""
        current = {"shard": "?"}

        def urls() -> Iterator[dict]:
            for shard in shards:
                current["shard"] = shard
                if not tar_has_end_marker(shard):
                    self.skip_log.skip(shard, None, "truncated tar: no end-of-archive marker, "
                                                    "reading the intact samples before the cut")
                yield {"url": shard}

        def handler(err: Exception) -> bool:
            message = str(err.args[0]) if err.args else type(err).__name__
            message = message.split(" @ <")[0]  # webdataset appends the stream repr
            self.skip_log.skip(current["shard"], None, f"unreadable tar: {type(err).__name__}: {message}")
            return True

        return wds.tarfile_to_samples(handler=handler)(urls())
