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

The code is split by job: :mod:`unified_mm.data.convert_common` (formats, skip reasons, records,
options, safe image paths, image loading), :mod:`unified_mm.data.convert_llava` and
:mod:`unified_mm.data.convert_coco` (parsing each input style, and the entry points),
:mod:`unified_mm.data.convert_output` (shard writing, the ``--out`` checks, the atomic output
directory). This module gathers their public names, so ``from unified_mm.data.converters import
...`` keeps working, and holds :data:`CONVERTERS`, the CLI's table of entry points.
"""
from __future__ import annotations

from typing import Callable

from unified_mm.data.convert_coco import CaptionIndex, coco_record, coco_records, convert_coco, index_captions
from unified_mm.data.convert_common import (COCO_FORMAT, DUPLICATE_ID, EMPTY_TEXT, LLAVA_FORMAT, MALFORMED,
                                            MANIFEST_NAME, MISSING_IMAGE, NO_CAPTIONS, NOT_ALTERNATING,
                                            PATH_ESCAPES, SPLIT_NAME, TAR_MTIME, TAR_OWNER, TEXT_ONLY,
                                            TEXT_SPLIT_SUFFIX, UNKNOWN_ROLE, UNREADABLE_IMAGE,
                                            WARNINGS_PER_REASON, ConversionResult, ConvertOptions, Record, Skip,
                                            check_image_root, format_counts, load_png, log, png_bytes,
                                            read_json_file, resize_center_crop, safe_image_path)
from unified_mm.data.convert_llava import (IMAGE_PLACEHOLDER, ROLES, convert_llava, llava_record, llava_records,
                                           normalise_conversation, strip_image_placeholder)
from unified_mm.data.convert_output import (Plan, ShardSink, SkipCounter, SplitWriter, check_inputs,
                                            check_split_name, convert, existing_dataset, read_manifest,
                                            write_split)

__all__ = [
    # formats and constants
    "LLAVA_FORMAT", "COCO_FORMAT", "MANIFEST_NAME", "TAR_MTIME", "TAR_OWNER", "TEXT_SPLIT_SUFFIX", "SPLIT_NAME",
    "WARNINGS_PER_REASON", "IMAGE_PLACEHOLDER", "ROLES", "log",
    # skip reasons
    "MISSING_IMAGE", "UNREADABLE_IMAGE", "PATH_ESCAPES", "TEXT_ONLY", "UNKNOWN_ROLE", "NOT_ALTERNATING",
    "EMPTY_TEXT", "MALFORMED", "NO_CAPTIONS", "DUPLICATE_ID",
    # records, options, results
    "Skip", "Record", "ConvertOptions", "ConversionResult", "format_counts",
    # input files and images
    "read_json_file", "check_image_root", "safe_image_path", "resize_center_crop", "png_bytes", "load_png",
    # LLaVA conversations
    "strip_image_placeholder", "normalise_conversation", "llava_record", "llava_records", "convert_llava",
    # COCO captions
    "CaptionIndex", "index_captions", "coco_record", "coco_records", "convert_coco",
    # writing and the output directory
    "SkipCounter", "ShardSink", "SplitWriter", "write_split", "read_manifest", "check_split_name",
    "existing_dataset", "Plan", "check_inputs", "convert",
    "CONVERTERS",
]

CONVERTERS: dict[str, Callable[..., ConversionResult]] = {"llava": convert_llava, "coco": convert_coco}
