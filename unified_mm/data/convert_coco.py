"""COCO captions -> shards: indexing the captions, one record per image, and :func:`convert_coco`.

Input: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`` plus an
image folder; one sample per captioned image: ``{"key", "source_id", "source_index",
"source_image", "captions": [...], "image_size"}``.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, NamedTuple

from mmcore.errors import UserError
from unified_mm.data.convert_common import (COCO_FORMAT, DUPLICATE_ID, MALFORMED, NO_CAPTIONS, ConversionResult,
                                            ConvertOptions, Record, Skip, log, read_json_file)
from unified_mm.data.convert_output import _source, check_inputs, convert


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


def convert_coco(json_path: str | Path, images: str | Path, out: str | Path,
                 options: ConvertOptions) -> ConversionResult:
    """COCO captions JSON + image folder -> one sample per captioned image."""
    plan = check_inputs(json_path, images, out, COCO_FORMAT, options)
    records = coco_records(read_json_file(json_path), json_path)
    return convert(records, plan, COCO_FORMAT, options, _source(json_path, images))
