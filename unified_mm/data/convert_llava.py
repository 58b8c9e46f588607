"""LLaVA conversations -> shards: parsing the records and the :func:`convert_llava` entry point.

Input: a JSON list of ``{"id", "image" (optional), "conversations": [{"from": "human"|"gpt",
"value": ...}, ...]}`` plus an image folder. Each sample's JSON is ``{"key", "source_id",
"source_index", "source_image", "conversations": [{"role": "user"|"assistant", "text"}],
"image_turn": 0, "image_size"}``: roles normalised, the ``<image>`` placeholder removed (our chat
template always puts the image at the start of the first user turn, hence ``image_turn`` 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmcore.errors import UserError
from unified_mm.data.convert_common import (EMPTY_TEXT, LLAVA_FORMAT, MALFORMED, NOT_ALTERNATING, UNKNOWN_ROLE,
                                            ConversionResult, ConvertOptions, Record, Skip, read_json_file)
from unified_mm.data.convert_output import _source, check_inputs, convert

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


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


def convert_llava(json_path: str | Path, images: str | Path, out: str | Path,
                  options: ConvertOptions) -> ConversionResult:
    """LLaVA conversation JSON + image folder -> shards (see the module docstring)."""
    plan = check_inputs(json_path, images, out, LLAVA_FORMAT, options)
    records = llava_records(read_json_file(json_path), json_path)
    return convert(records, plan, LLAVA_FORMAT, options, _source(json_path, images))
