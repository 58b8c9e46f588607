"""What the LLaVA and COCO converters share: output formats and constants, skip reasons, the parsed
:class:`Record`, :class:`ConvertOptions` / :class:`ConversionResult`, input-file checks (including
:func:`safe_image_path`, which keeps image paths inside the image root) and image loading
(:func:`resize_center_crop`, :func:`load_png`).

The input-specific parsing is in :mod:`unified_mm.data.convert_llava` and
:mod:`unified_mm.data.convert_coco`, shard writing and the output directory in
:mod:`unified_mm.data.convert_output`; :mod:`unified_mm.data.converters` gathers the public names.
"""
from __future__ import annotations

import io
import logging
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple

from PIL import Image, ImageOps

from mmcore.errors import UserError
from mmcore.io import read_json

# One logger for the whole converter, under the name it had when it was one module:
# convert_cli attaches its stderr handler to "unified_mm.data.converters".
log = logging.getLogger("unified_mm.data.converters")

LLAVA_FORMAT = "llava-webdataset/1"
COCO_FORMAT = "coco-captions-webdataset/1"
MANIFEST_NAME = "manifest.json"
TAR_MTIME, TAR_OWNER = 0, "converter"      # fixed, so the same input gives the same shard bytes
TEXT_SPLIT_SUFFIX = "_text"                # --keep-text-only: json-only samples in {split}_text
SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")  # no '-' or '.': shard names are {split}-NNNNN.tar
WARNINGS_PER_REASON = 10                   # then one "not shown" line, so 100k bad files don't flood

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
