"""Bring real image-text datasets in as the project's webdataset shards.

Two input styles are converted (the CLI is :mod:`unified_mm.data.convert_cli`):

* **LLaVA conversations** -- a JSON list of ``{"id", "image" (optional), "conversations":
  [{"from": "human"|"gpt", "value": ...}, ...]}`` plus an image folder. Each sample's JSON is
  ``{"key", "source_id", "source_index", "source_image", "conversations": [{"role": "user"|
  "assistant", "text"}], "image_turn": 0, "image_size"}``: roles normalised, the ``<image>``
  placeholder removed (our chat template always puts the image at the start of the first user
  turn, hence ``image_turn`` 0).
* **COCO captions** -- ``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}``; one sample per image: ``{"key", "source_id", "source_index", "source_image",
  "captions": [...], "image_size"}``.

The output is what the rest of the project reads (:class:`~unified_mm.data.shards.ShardDataset`,
``tokenizer_cli precompute``): ``{split}-NNNNN.tar`` shards of ``<key>.png`` + ``<key>.json``,
images RGB and ``S x S`` (short side resized to S with bicubic, then centre-cropped), plus
``manifest.json`` with per-split sample counts, shard names and skip counts by reason.

Why records are skipped rather than fatal: real datasets always hold a few broken entries, and a
converter that stops at the first one is useless on 600k records. But a run in which *most*
records are bad is almost certainly a wrong ``--images`` folder, so past ``max_skip_fraction``
the conversion fails and writes nothing. Image paths from the JSON never escape the image root
(absolute paths, ``..``, symlinks pointing outside), so a hostile JSON cannot read other files.

The output directory is written whole into a temporary sibling and renamed at the end
(:func:`mmcore.io.atomic_output_dir`): an error or interrupt leaves no partial dataset.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterator, NamedTuple

from PIL import Image, ImageOps
from tqdm import tqdm
from webdataset import TarWriter

from mmcore.errors import UserError
from mmcore.io import atomic_output_dir, atomic_write_json, read_json

log = logging.getLogger(__name__)

LLAVA_FORMAT = "llava-webdataset/1"
COCO_FORMAT = "coco-captions-webdataset/1"
MANIFEST_NAME = "manifest.json"
TAR_MTIME, TAR_OWNER = 0, "converter"      # fixed, so the same input gives the same shard bytes
TEXT_SPLIT_SUFFIX = "_text"                # --keep-text-only: json-only samples in {split}_text
SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")  # no '-' or '.': shard names are {split}-NNNNN.tar
WARNINGS_PER_REASON = 10                   # then one "not shown" line, so 100k bad files don't flood
IMAGE_PLACEHOLDER = "<image>"

# Skip reasons: the keys of the manifest's "skipped" counts.
MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
PATH_ESCAPES = "path escapes image root"
TEXT_ONLY = "text-only record"
UNKNOWN_ROLE = "unknown role"
NOT_ALTERNATING = "turns do not alternate"
EMPTY_TEXT = "empty text"
MALFORMED = "malformed record"
NO_CAPTIONS = "no captions"
DUPLICATE_ID = "duplicate image id"

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class Skip(Exception):
    """One record is unusable: ``reason`` (a fixed string, counted) and ``detail`` (for the log)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class Record(NamedTuple):
    """One input record, parsed: the output meta (no key yet) and its image path, or why it is
    unusable. ``image`` None with ``skip`` None means a text-only record."""
    index: int                       # position in the input, for messages and "source_index"
    meta: dict
    image: str | None
    skip: Skip | None = None


class ConvertOptions(NamedTuple):
    image_size: int
    split: str = "train"
    shard_size: int = 1000
    limit: int | None = None
    max_skip_fraction: float = 0.5
    keep_text_only: bool = False
    overwrite: bool = False
    add_split: bool = False
    workers: int = 1
    progress: bool = True


class ConversionResult(NamedTuple):
    out: Path
    manifest: dict
    split: str
    records: int                     # records considered (after --limit)
    written: int                     # image samples written to {split}-*.tar
    text_written: int                # json-only samples written to {split}_text-*.tar
    skipped: dict[str, int]          # reason -> count

    def summary(self) -> str:
        """The one-line report the CLI prints."""
        shards = len(self.manifest["splits"][self.split]["shards"])
        line = f"wrote {self.written} {self.split} samples ({shards} shard{'s' * (shards != 1)})"
        if self.text_written:
            line += f" + {self.text_written} text-only in {self.split}{TEXT_SPLIT_SUFFIX}"
        return f"{line} to {self.out}; skipped {format_counts(self.skipped)}"


def format_counts(counts: dict[str, int]) -> str:
    """``"3 (no captions 2, unreadable image 1)"``, or ``"0"``."""
    total = sum(counts.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) + ")"


# ---------------------------------------------------------------------------------------------
# Input files
# ---------------------------------------------------------------------------------------------

def read_json_file(path: str | Path, flag: str = "--json") -> Any:
    """The parsed JSON file; a one-line :class:`UserError` naming it when missing or invalid."""
    path = Path(path)
    if not path.is_file():
        return read_json(path, f"{flag} file")  # raises: "--json file not found: ..."
    try:
        return read_json(path)
    except UserError as err:
        raise UserError(f"{flag} {err}") from None


def check_image_root(images: str | Path) -> Path:
    root = Path(images)
    if not root.is_dir():
        raise UserError(f"--images directory not found: {root}")
    return root


def safe_image_path(root: Path, relative: Any) -> Path:
    """``root / relative``, resolved, refusing anything that would read outside ``root``.

    Checked on the text first (absolute paths, drive letters, ``..``), then on the resolved path,
    which catches symlinks (of the file or of a folder on the way) pointing outside the root.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise Skip(MALFORMED, f"image path must be a non-empty string, got {relative!r}")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise Skip(PATH_ESCAPES, f"absolute image path {relative!r}")
    if ".." in posix.parts or ".." in windows.parts:
        raise Skip(PATH_ESCAPES, f"'..' in image path {relative!r}")
    real_root = root.resolve()
    try:
        path = (real_root / relative).resolve()
    except (OSError, ValueError, RuntimeError) as err:  # NUL bytes, symlink loops
        raise Skip(MALFORMED, f"bad image path {relative!r}: {err}") from None
    if not path.is_relative_to(real_root):
        raise Skip(PATH_ESCAPES, f"image path {relative!r} resolves to {path}, outside {real_root}")
    if not path.is_file():
        raise Skip(MISSING_IMAGE, f"{root / relative}" + (" is a directory" if path.is_dir() else " not found"))
    return path


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """RGB ``size x size``: short side resized to ``size`` (bicubic), long side centre-cropped.

    Cropping rather than padding or squashing keeps object shapes and fills every pixel, which
    is what the tokenizer was trained on; the crop box is computed in source pixels, so the result
    does not depend on rounding an intermediate size.
    """
    return ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC,
                        centering=(0.5, 0.5))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def load_png(path: Path, size: int) -> bytes:
    """The file as a ``size x size`` RGB PNG; :class:`Skip` (unreadable image) when it is not one.

    EXIF orientation is applied (captions describe the photo as it is displayed). Large JPEGs are
    decoded at a reduced DCT scale that still leaves both sides >= ``size``: much faster, and the
    bicubic resize that follows does the rest.
    """
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            img.load()
            image = ImageOps.exif_transpose(img)
            return png_bytes(resize_center_crop(image, size))
    except Exception as err:  # PIL raises many types for bad bytes
        raise Skip(UNREADABLE_IMAGE, f"{path}: {type(err).__name__}: {err}") from None


def _load_task(task: tuple[str, str, int]) -> tuple[bytes | None, str, str]:
    """Worker-process entry (top level so it pickles): (png or None, skip reason, detail)."""
    root, relative, size = task
    try:
        return load_png(safe_image_path(Path(root), relative), size), "", ""
    except Skip as skip:
        return None, skip.reason, skip.detail


# ---------------------------------------------------------------------------------------------
# LLaVA conversations
# ---------------------------------------------------------------------------------------------

def strip_image_placeholder(text: str) -> str:
    """Text without ``<image>`` and the whitespace (usually one newline) around it.

    LLaVA data has ``"<image>\\nQ"`` and ``"Q\\n<image>"``; a placeholder inside the text joins its
    two sides with one space.
    """
    parts = (part.strip() for part in text.split(IMAGE_PLACEHOLDER))
    return " ".join(part for part in parts if part)


def normalise_conversation(turns: Any) -> list[dict]:
    """``[{"role": "user"|"assistant", "text"}]`` from LLaVA turns, or :class:`Skip` saying why not.

    Turns must alternate user/assistant, starting with the user and ending with the assistant
    (the template trains on assistant answers; a trailing question has no target).
    """
    if not isinstance(turns, list):
        raise Skip(MALFORMED, f"'conversations' must be a list, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise Skip(MALFORMED, f"turn {i} must be an object with a string 'value'")
        speaker = turn.get("from")
        role = ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise Skip(UNKNOWN_ROLE, f"turn {i} is from {speaker!r} (known: {', '.join(ROLES)})")
        text = strip_image_placeholder(turn["value"])
        if not text:
            raise Skip(EMPTY_TEXT, f"turn {i} ({role}) has no text")
        out.append({"role": role, "text": text})
    expected = ["user", "assistant"] * (len(out) // 2)
    roles = [turn["role"] for turn in out]
    if not out or roles != expected:
        raise Skip(NOT_ALTERNATING, f"roles {roles}; need user, assistant, user, ..., assistant")
    return out


def llava_record(index: int, raw: Any) -> Record:
    """One LLaVA record parsed into output meta (text checks only; the image is read later)."""
    if not isinstance(raw, dict):
        return Record(index, {}, None, Skip(MALFORMED, f"record must be an object, got {type(raw).__name__}"))
    try:
        conversations = normalise_conversation(raw.get("conversations"))
    except Skip as skip:
        return Record(index, {}, None, skip)
    meta = {"source_id": raw.get("id", index), "source_index": index, "conversations": conversations}
    image = raw.get("image")
    if image is None:
        return Record(index, meta, None)
    meta.update(source_image=image, image_turn=0)
    return Record(index, meta, image)


def llava_records(data: Any, path: str | Path = "--json") -> list[Record]:
    if not isinstance(data, list):
        raise UserError(f"{path}: a LLaVA file is a JSON list of records, got a {type(data).__name__}")
    return [llava_record(i, raw) for i, raw in enumerate(data)]


# ---------------------------------------------------------------------------------------------
# COCO captions
# ---------------------------------------------------------------------------------------------

class CaptionIndex(NamedTuple):
    captions: dict[Any, list[str]]   # image id -> captions in file order
    ignored: int                     # annotations without a usable image id or caption


def index_captions(annotations: list) -> CaptionIndex:
    captions: dict[Any, list[str]] = collections.defaultdict(list)
    ignored = 0
    for ann in annotations:
        if not (isinstance(ann, dict) and isinstance(ann.get("caption"), str)
                and isinstance(ann.get("image_id"), (int, str))):
            ignored += 1
            continue
        if ann["caption"].strip():
            captions[ann["image_id"]].append(ann["caption"].strip())
    return CaptionIndex(dict(captions), ignored)


def coco_record(index: int, raw: Any, captions: dict[Any, list[str]], seen: set) -> Record:
    if not (isinstance(raw, dict) and isinstance(raw.get("id"), (int, str))):
        return Record(index, {}, None, Skip(MALFORMED, f"image entry {index} needs an int or string 'id'"))
    image_id = raw["id"]
    if image_id in seen:
        return Record(index, {}, None, Skip(DUPLICATE_ID, f"image id {image_id!r} listed again"))
    seen.add(image_id)
    if not isinstance(raw.get("file_name"), str):
        return Record(index, {}, None, Skip(MALFORMED, f"image id {image_id!r} has no string 'file_name'"))
    if not captions.get(image_id):
        return Record(index, {}, None, Skip(NO_CAPTIONS, f"image id {image_id!r} ({raw['file_name']})"))
    meta = {"source_id": image_id, "source_index": index, "source_image": raw["file_name"],
            "captions": captions[image_id]}
    return Record(index, meta, raw["file_name"])


def coco_records(data: Any, path: str | Path = "--json") -> list[Record]:
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise UserError(f"{path}: a COCO captions file is an object with lists 'images' and 'annotations'")
    index = index_captions(data["annotations"])
    if index.ignored:
        log.warning("%s: ignored %d annotations without an 'image_id' and a string 'caption'",
                    path, index.ignored)
    seen: set = set()
    return [coco_record(i, raw, index.captions, seen) for i, raw in enumerate(data["images"])]


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


def convert_llava(json_path: str | Path, images: str | Path, out: str | Path,
                  options: ConvertOptions) -> ConversionResult:
    """LLaVA conversation JSON + image folder -> shards (see the module docstring)."""
    plan = check_inputs(json_path, images, out, LLAVA_FORMAT, options)
    records = llava_records(read_json_file(json_path), json_path)
    return convert(records, plan, LLAVA_FORMAT, options, _source(json_path, images))


def convert_coco(json_path: str | Path, images: str | Path, out: str | Path,
                 options: ConvertOptions) -> ConversionResult:
    """COCO captions JSON + image folder -> one sample per captioned image."""
    plan = check_inputs(json_path, images, out, COCO_FORMAT, options)
    records = coco_records(read_json_file(json_path), json_path)
    return convert(records, plan, COCO_FORMAT, options, _source(json_path, images))


def _source(json_path: str | Path, images: str | Path) -> dict:
    return {"json": str(json_path), "images": str(images)}


CONVERTERS: dict[str, Callable[..., ConversionResult]] = {"llava": convert_llava, "coco": convert_coco}
