"""Writing converted records: shards (:class:`ShardSink`), skip counting, the checks on ``--out``
(``--overwrite`` / ``--add-split``) and :func:`convert`, which assembles the whole output directory
atomically.

Used by :mod:`unified_mm.data.convert_llava` and :mod:`unified_mm.data.convert_coco`; the output
layout is described in :mod:`unified_mm.data.converters`.
"""
from __future__ import annotations

import collections
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Iterator, NamedTuple

from tqdm import tqdm
from webdataset import TarWriter

from mmcore.errors import UserError
from mmcore.io import atomic_output_dir, atomic_write_json
from unified_mm.data.convert_common import (MANIFEST_NAME, SPLIT_NAME, TAR_MTIME, TAR_OWNER, TEXT_ONLY,
                                            TEXT_SPLIT_SUFFIX, WARNINGS_PER_REASON, ConversionResult,
                                            ConvertOptions, Record, Skip, _load_task, check_image_root,
                                            format_counts, log)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

class SkipCounter:
    """Counts skips by reason and logs the first few of each reason, naming record and file."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def skip(self, record: Record, skip: Skip) -> None:
        self.counts[skip.reason] += 1
        n = self.counts[skip.reason]
        if n <= WARNINGS_PER_REASON:
            log.warning("skipped record %d: %s: %s", record.index, skip.reason, skip.detail)
        if n == WARNINGS_PER_REASON:
            log.warning("(further %r skips are counted but not shown)", skip.reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class ShardSink:
    """Writes samples to ``{prefix}-NNNNN.tar`` in ``directory``, ``shard_size`` per shard."""

    def __init__(self, directory: Path, prefix: str, shard_size: int):
        self.directory, self.prefix, self.shard_size = directory, prefix, shard_size
        self.names: list[str] = []
        self.count = 0
        self._stream = self._writer = None

    def write(self, meta: dict, png: bytes | None) -> str:
        """Add one sample (key ``{prefix}-{n:06d}`` put into ``meta``); returns the key."""
        if self.count % self.shard_size == 0:
            self._open_next()
        key = f"{self.prefix}-{self.count:06d}"
        sample = {"__key__": key, "json": json.dumps({"key": key, **meta}, ensure_ascii=False,
                                                     sort_keys=True).encode("utf-8")}
        if png is not None:
            sample["png"] = png
        self._writer.write(sample)
        self.count += 1
        return key

    def _open_next(self) -> None:
        self.close()
        self.names.append(f"{self.prefix}-{len(self.names):05d}.tar")
        self._stream = open(self.directory / self.names[-1], "wb")
        self._writer = TarWriter(self._stream, user=TAR_OWNER, group=TAR_OWNER, mtime=TAR_MTIME)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()   # ends the tar; a stream passed in stays open
            self._stream.close()
            self._stream = self._writer = None


def _image_results(records: list[Record], root: Path, size: int, workers: int
                   ) -> Iterator[tuple[bytes | None, str, str]]:
    """Loaded PNGs for the records that have an image, in record order (a process pool for
    ``workers`` > 1; ordered, so the output does not depend on the number of workers)."""
    tasks = ((str(root), r.image, size) for r in records if r.skip is None and r.image is not None)
    if workers <= 1:
        yield from map(_load_task, tasks)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(_load_task, tasks, chunksize=8)


def _check_skip_fraction(skips: SkipCounter, done: int, records: int, limit: float) -> None:
    """Fail as soon as more than ``limit`` of all records are certain to be skipped (no need to
    read the rest of a folder that is plainly the wrong one)."""
    if skips.total > limit * records:
        where = f" (stopped after record {done})" if done < records else ""
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skips.counts.items()))
        raise UserError(f"{skips.total} of {records} records skipped ({reasons}){where}, more than "
                        f"--max-skip-fraction {limit:g}; nothing written "
                        "(wrong --images folder?)")


class SplitWriter(NamedTuple):
    images: ShardSink   # {split}-*.tar
    texts: ShardSink    # {split}_text-*.tar (text-only records, --keep-text-only)
    skips: SkipCounter


def _write_record(record: Record, writer: SplitWriter, results: Iterator, options: ConvertOptions) -> None:
    """Write one record where it belongs, or count why not."""
    if record.skip is not None:
        writer.skips.skip(record, record.skip)
    elif record.image is None and options.keep_text_only:
        writer.texts.write(record.meta, None)
    elif record.image is None:
        writer.skips.skip(record, Skip(TEXT_ONLY, "no 'image' (pass --keep-text-only to keep it)"))
    else:
        png, reason, detail = next(results)
        if png is None:
            writer.skips.skip(record, Skip(reason, detail))
        else:
            writer.images.write({**record.meta, "image_size": options.image_size}, png)


def write_split(records: list[Record], root: Path, directory: Path, options: ConvertOptions) -> SplitWriter:
    """Write the image samples (and kept text-only ones) of one split into ``directory``."""
    writer = SplitWriter(ShardSink(directory, options.split, options.shard_size),
                         ShardSink(directory, options.split + TEXT_SPLIT_SUFFIX, options.shard_size),
                         SkipCounter())
    results = _image_results(records, root, options.image_size, options.workers)
    bar = tqdm(total=len(records), desc=f"convert {options.split}", unit="rec", disable=not options.progress)
    try:
        for done, record in enumerate(records, 1):
            _write_record(record, writer, results, options)
            bar.update()
            _check_skip_fraction(writer.skips, done, len(records), options.max_skip_fraction)
    finally:
        bar.close()
        results.close()  # stops a worker pool early on errors
        writer.images.close()
        writer.texts.close()
    return writer


# ---------------------------------------------------------------------------------------------
# The output directory
# ---------------------------------------------------------------------------------------------

def read_manifest(out: Path) -> dict | None:
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("splits"), dict) else None


def check_split_name(split: str) -> None:
    if not SPLIT_NAME.fullmatch(split):
        raise UserError(f"--split {split!r}: use letters, digits and '_' only (shards are {{split}}-NNNNN.tar)")


def existing_dataset(out: Path, fmt: str, options: ConvertOptions) -> dict | None:
    """Check ``out`` before any work; returns the manifest whose other splits are kept
    (``add_split``), or None when ``out`` is written from scratch.

    ``--overwrite`` replaces a whole directory only when it is empty or is a dataset (has a
    manifest), so a mistyped ``--out $HOME`` cannot delete anything.
    """
    check_split_name(options.split)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    manifest = read_manifest(out)
    if not options.add_split:
        if not options.overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite to replace it, or --add-split "
                            f"to add split {options.split!r} to the dataset there")
        if manifest is None:
            raise UserError(f"--out {out} is not empty and has no {MANIFEST_NAME}; refusing to replace "
                            "a directory that is not a dataset (remove it yourself)")
        return None
    return _check_add_split(out, manifest, fmt, options)


def _check_add_split(out: Path, manifest: dict | None, fmt: str, options: ConvertOptions) -> dict:
    if manifest is None:
        raise UserError(f"--add-split: {out} has no readable {MANIFEST_NAME}")
    if manifest.get("format") != fmt or manifest.get("image_size") != options.image_size:
        raise UserError(f"--add-split: {out} holds {manifest.get('format')!r} at image size "
                        f"{manifest.get('image_size')}, not {fmt!r} at {options.image_size}")
    if options.split in manifest["splits"] and not options.overwrite:
        raise UserError(f"--add-split: {out} already has split {options.split!r}; pass --overwrite to replace it")
    for name, info in manifest["splits"].items():  # names from a data file: plain files inside out only
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(n, str) and n and Path(n).name == n and n not in (".", "..") and "\\" not in n
                and (out / n).is_file() for n in shards):
            raise UserError(f"--add-split: {out / MANIFEST_NAME}: split {name!r} must list the shard files of "
                            f"{out} by name, got {shards!r:.200}")
    known = {MANIFEST_NAME} | {name for info in manifest["splits"].values() for name in info.get("shards", [])}
    unknown = sorted(p.name for p in out.iterdir() if p.name not in known)
    if unknown:
        raise UserError(f"--add-split: {out} holds files its manifest does not list ({', '.join(unknown[:3])}"
                        f"{', ...' if len(unknown) > 3 else ''}); refusing to drop them")
    return manifest


def _kept_splits(manifest: dict | None, split: str) -> dict[str, dict]:
    """The splits of an existing dataset that stay (all but ``split`` and its text split)."""
    if manifest is None:
        return {}
    return {name: info for name, info in manifest["splits"].items()
            if name not in (split, split + TEXT_SPLIT_SUFFIX)}


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard link (free, same file system) else copy: the kept shards move into the new directory."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class Plan(NamedTuple):
    """Checked inputs of one conversion."""
    root: Path               # the image folder
    out: Path
    old: dict | None         # manifest of the dataset in ``out`` whose other splits are kept


def check_inputs(json_path: str | Path, images: str | Path, out: str | Path, fmt: str,
                 options: ConvertOptions) -> Plan:
    """Every check that needs no records, done before reading a JSON that may take a minute."""
    if options.image_size < 1 or options.shard_size < 1 or options.workers < 1:
        raise UserError("--image-size, --shard-size and --workers must be >= 1")
    if options.limit is not None and options.limit < 1:
        raise UserError(f"--limit {options.limit} must be >= 1")
    if not 0.0 <= options.max_skip_fraction <= 1.0:
        raise UserError(f"--max-skip-fraction {options.max_skip_fraction:g} must be between 0 and 1")
    if not Path(json_path).is_file():
        raise UserError(f"--json file not found: {json_path}")
    root, out = check_image_root(images), Path(out)
    return Plan(root, out, existing_dataset(out, fmt, options))


def convert(records: list[Record], plan: Plan, fmt: str, options: ConvertOptions,
            source: dict) -> ConversionResult:
    """Write ``records`` as split ``options.split`` of the dataset in ``plan.out`` (atomically).

    ``source`` (input paths) goes into the manifest. Everything -- kept splits of an existing
    dataset included -- is assembled in a temporary directory that replaces ``out`` at the end.
    """
    records = records[:options.limit] if options.limit is not None else records
    if not records:
        raise UserError(f"{source['json']}: no records to convert")
    with atomic_output_dir(plan.out) as tmp:
        splits = _kept_splits(plan.old, options.split)
        for info in splits.values():
            for name in info["shards"]:
                _link_or_copy(plan.out / name, tmp / name)
        image_sink, text_sink, skips = write_split(records, plan.root, tmp, options)
        if not image_sink.count and not text_sink.count:
            raise UserError(f"no usable records among {len(records)}: {format_counts(skips.counts)}")
        skipped = dict(sorted(skips.counts.items()))
        splits[options.split] = {"samples": image_sink.count, "shards": image_sink.names,
                                 "records": len(records), "skipped": skipped, "source": source}
        if text_sink.count:
            splits[options.split + TEXT_SPLIT_SUFFIX] = {"samples": text_sink.count, "shards": text_sink.names,
                                                         "fields": ["json"], "source": source}
        manifest = {"format": fmt, "image_size": options.image_size, "fields": ["png", "json"],
                    "splits": dict(sorted(splits.items()))}
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return ConversionResult(plan.out, manifest, options.split, len(records), image_sink.count,
                            text_sink.count, skipped)


def _source(json_path: str | Path, images: str | Path) -> dict:
    return {"json": str(json_path), "images": str(images)}
