"""Real benchmark formats: readers for VQAv2, COCO captions, GenEval prompt lists and LLaVA data
(LLaVA answer files are :mod:`eval.answer_file`; the JSON checks, :mod:`eval.json_fields`).

Every reader validates what it uses and raises :class:`mmcore.errors.UserError` naming the file
and the field (``vqa_q.json: questions[3].question_id: expected an integer or string, got
None``); unknown extra fields in the official files are ignored unless noted.

Formats (as published by each benchmark):

* **VQAv2** questions ``{"data_subtype": "val2014", "questions": [{"question_id", "image_id",
  "question"}]}`` and annotations ``{"annotations": [{"question_id", "image_id", "answers":
  [{"answer", ...}] x 10, "multiple_choice_answer", "answer_type", "question_type"}]}``; images
  are ``COCO_{data_subtype}_{image_id:012d}.jpg``.
* **COCO captions** ``{"images": [{"id", "file_name", ...}], "annotations": [{"image_id",
  "caption", ...}]}`` (``annotations`` absent in image-info files of unannotated splits).
* **GenEval** prompt list, one JSON object a line: ``{"prompt", "tag", "include": [{"class",
  "count", "color"?, "position"?}], "exclude"?: [...]}``. ShapesWorld spellings are accepted too
  (``shape`` for ``class``, ``colour`` for ``color``), ``size`` is an extra optional attribute, and
  ``position`` may be an absolute position name (ShapesWorld) or GenEval's ``[relation, index]``.
  Written back with GenEval's spellings.
* **LLaVA** instruction data: a JSON list of ``{"id", "image"?, "conversations": [{"from":
  "human"|"gpt", "value"}]}``, and LLaVA's evaluation question files, JSONL ``{"question_id",
  "image"?, "text", ...}``; image paths are relative to an image folder and may not leave it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, NamedTuple

from eval.json_fields import (id_field, iter_jsonl, json_object, list_field, load_json_file,
                              positive_int_field, string_field, type_name)
from mmcore.errors import UserError
from mmcore.io import atomic_write_text


GENEVAL_ITEM_FIELDS = {"class", "count", "color", "position", "size"}
GENEVAL_ALIASES = {"shape": "class", "colour": "color"}   # ShapesWorld spelling -> GenEval's


# ---------------------------------------------------------------------------------------------
# VQAv2
# ---------------------------------------------------------------------------------------------

class VQAQuestion(NamedTuple):
    question_id: int | str
    image_id: int | str
    question: str
    image_file: str | None                 # COCO file name when the data subtype is known
    answers: list[str] | None              # the annotators' answers (None without annotations)
    multiple_choice_answer: str | None
    answer_type: str | None                # "yes/no", "number", "other"
    question_type: str | None              # e.g. "what color is the"


def coco_image_filename(image_id: int, data_subtype: str) -> str:
    """COCO's image file name, e.g. ``COCO_val2014_000000000042.jpg``."""
    return f"COCO_{data_subtype}_{int(image_id):012d}.jpg"


def _read_vqa_annotations(path: str | Path) -> dict:
    data = json_object(load_json_file(path, "VQAv2 annotation file"), str(path))
    annotations = {}
    for index, item in enumerate(list_field(data, "annotations", str(path))):
        where = f"{path}: annotations[{index}]"
        item = json_object(item, where)
        qid = id_field(item, "question_id", where)
        if qid in annotations:
            raise UserError(f"{where}.question_id: duplicate question id {qid!r}")
        answers = []
        for j, answer in enumerate(list_field(item, "answers", where)):
            answer_where = f"{where}.answers[{j}]"
            answers.append(string_field(json_object(answer, answer_where), "answer", answer_where))
        if not answers:
            raise UserError(f"{where}.answers: no answers")
        annotations[qid] = (id_field(item, "image_id", where), answers,
                            string_field(item, "multiple_choice_answer", where, optional=True),
                            string_field(item, "answer_type", where, optional=True),
                            string_field(item, "question_type", where, optional=True))
    return annotations


def read_vqav2(questions_path: str | Path, annotations_path: str | Path | None = None) -> list[VQAQuestion]:
    """VQAv2 questions, joined with their annotations when an annotation file is given (the two
    must cover the same question ids with the same image ids)."""
    data = json_object(load_json_file(questions_path, "VQAv2 question file"), str(questions_path))
    subtype = string_field(data, "data_subtype", str(questions_path), optional=True)
    annotations = _read_vqa_annotations(annotations_path) if annotations_path is not None else None
    questions, seen = [], set()
    for index, item in enumerate(list_field(data, "questions", str(questions_path))):
        where = f"{questions_path}: questions[{index}]"
        item = json_object(item, where)
        qid = id_field(item, "question_id", where)
        image_id = id_field(item, "image_id", where)
        if qid in seen:
            raise UserError(f"{where}.question_id: duplicate question id {qid!r}")
        seen.add(qid)
        image_file = coco_image_filename(image_id, subtype) if subtype and isinstance(image_id, int) else None
        extra = (None, None, None, None)
        if annotations is not None:
            if qid not in annotations:
                raise UserError(f"{annotations_path}: no annotation for question {qid!r} of {questions_path}")
            annotated_image, *extra = annotations[qid]
            if annotated_image != image_id:
                raise UserError(f"{annotations_path}: question {qid!r} has image_id {annotated_image!r}, "
                                f"but {questions_path} says {image_id!r}")
        questions.append(VQAQuestion(qid, image_id, string_field(item, "question", where), image_file, *extra))
    if annotations is not None and len(annotations) != len(seen):
        extra_ids = [qid for qid in annotations if qid not in seen]
        raise UserError(f"{annotations_path}: annotation for question {extra_ids[0]!r}, which is not in "
                        f"{questions_path}")
    return questions


# ---------------------------------------------------------------------------------------------
# COCO captions
# ---------------------------------------------------------------------------------------------

class CocoImage(NamedTuple):
    image_id: int | str
    file_name: str
    captions: list[str]     # empty for images without annotations


def read_coco_captions(path: str | Path) -> list[CocoImage]:
    """Images of a COCO caption file with all their reference captions, in file order."""
    data = json_object(load_json_file(path, "COCO caption file"), str(path))
    images: dict = {}
    for index, item in enumerate(list_field(data, "images", str(path))):
        where = f"{path}: images[{index}]"
        item = json_object(item, where)
        image_id = id_field(item, "id", where)
        if image_id in images:
            raise UserError(f"{where}.id: duplicate image id {image_id!r}")
        images[image_id] = CocoImage(image_id, string_field(item, "file_name", where), [])
    if "annotations" in data:
        for index, item in enumerate(list_field(data, "annotations", str(path))):
            where = f"{path}: annotations[{index}]"
            item = json_object(item, where)
            image_id = id_field(item, "image_id", where)
            if image_id not in images:
                raise UserError(f"{where}.image_id: image {image_id!r} is not listed in 'images'")
            images[image_id].captions.append(string_field(item, "caption", where).strip())
    return list(images.values())


# ---------------------------------------------------------------------------------------------
# GenEval prompt lists
# ---------------------------------------------------------------------------------------------

class GenEvalPrompt(NamedTuple):
    prompt: str
    tag: str
    include: list[dict]     # items with GenEval keys: class, count, color?, position?, size?
    exclude: list[dict]
    key: str | None = None  # optional source sample (ShapesWorld key), for reports

    def to_json(self) -> dict:
        record = {"tag": self.tag, "include": self.include, "prompt": self.prompt}
        if self.exclude:
            record["exclude"] = self.exclude
        if self.key is not None:
            record["key"] = self.key
        return record


def _geneval_item(raw: Any, where: str) -> dict:
    raw = json_object(raw, where)
    item = {}
    for name, value in raw.items():
        canonical = GENEVAL_ALIASES.get(name, name)
        if canonical not in GENEVAL_ITEM_FIELDS:
            raise UserError(f"{where}: unknown field {name!r} (known: class/shape, count, "
                            f"color/colour, position, size)")
        if canonical in item:
            raise UserError(f"{where}: field {canonical!r} given twice (as {name!r})")
        item[canonical] = value
    string_field(item, "class", where)
    item["count"] = positive_int_field(item, "count", where) if "count" in item else 1
    for name in ("color", "size"):
        string_field(item, name, where, optional=True)
    if "position" in item:
        position = item["position"]
        relative = (isinstance(position, list) and len(position) == 2 and isinstance(position[0], str)
                    and isinstance(position[1], int) and not isinstance(position[1], bool))
        if not (isinstance(position, str) or relative):
            raise UserError(f"{where}.position: expected a position name or [relation, index], "
                            f"got {position!r}")
    return {k: item[k] for k in ("class", "count", "color", "size", "position") if item.get(k) is not None}


def parse_geneval_record(raw: Any, where: str) -> GenEvalPrompt:
    """One GenEval prompt record (see the module docstring), validated."""
    raw = json_object(raw, where)
    include = [_geneval_item(x, f"{where}.include[{i}]") for i, x in enumerate(list_field(raw, "include", where))]
    if not include:
        raise UserError(f"{where}.include: empty; a prompt must ask for at least one object")
    exclude = ([_geneval_item(x, f"{where}.exclude[{i}]") for i, x in enumerate(list_field(raw, "exclude", where))]
               if "exclude" in raw else [])
    return GenEvalPrompt(prompt=string_field(raw, "prompt", where),
                         tag=string_field(raw, "tag", where, optional=True) or "",
                         include=include, exclude=exclude, key=string_field(raw, "key", where, optional=True))


def read_geneval_jsonl(path: str | Path) -> list[GenEvalPrompt]:
    """All prompts of a GenEval-style JSONL prompt list."""
    prompts = [parse_geneval_record(raw, f"{path}:{line}") for line, raw in iter_jsonl(path, "prompt list")]
    if not prompts:
        raise UserError(f"{path}: the prompt list is empty")
    return prompts


def write_geneval_jsonl(path: str | Path, prompts: Iterable[GenEvalPrompt]) -> Path:
    """Write a GenEval-style JSONL prompt list atomically (GenEval spellings)."""
    lines = [json.dumps(p.to_json()) + "\n" for p in prompts]
    return atomic_write_text(Path(path), "".join(lines))


# ---------------------------------------------------------------------------------------------
# LLaVA data
# ---------------------------------------------------------------------------------------------

def resolve_image_path(image_root: str | Path, relative: str, where: str, check_exists: bool = True) -> Path:
    """``image_root / relative``, refusing absolute paths and ``..`` that would leave the root.

    The check is on the path as written (symbolic links the user placed inside the root are
    followed as usual); with ``check_exists`` a missing file is an error too.
    """
    parts = PurePosixPath(relative.replace("\\", "/"))
    if not relative or parts.is_absolute() or os.path.isabs(relative):
        raise UserError(f"{where}: image path {relative!r} must be relative to the image folder")
    depth = 0
    for part in parts.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise UserError(f"{where}: image path {relative!r} leaves the image folder {image_root}")
    path = Path(image_root) / Path(*parts.parts)
    if check_exists and not path.is_file():
        raise UserError(f"{where}: image not found: {path}")
    return path


def _images_field(item: dict, image_root: str | Path, where: str, check_exists: bool) -> tuple[Path, ...]:
    """LLaVA's optional ``image``: absent (text only), a path, or a list of paths."""
    value = item.get("image")
    if value is None:
        return ()
    names = value if isinstance(value, list) else [value]
    if not all(isinstance(n, str) for n in names):
        raise UserError(f"{where}.image: expected a path or a list of paths, got {value!r}")
    return tuple(resolve_image_path(image_root, n, f"{where}.image", check_exists) for n in names)


def _check_image_root(image_root: str | Path) -> None:
    if not Path(image_root).is_dir():
        raise UserError(f"image folder not found: {image_root}")


class LlavaSample(NamedTuple):
    id: int | str
    images: tuple[Path, ...]
    conversations: list[tuple[str, str]]   # (speaker: "human" | "gpt", text)


def read_llava_json(path: str | Path, image_root: str | Path, check_images: bool = True) -> list[LlavaSample]:
    """LLaVA instruction data (JSON list of conversations), image paths under ``image_root``."""
    _check_image_root(image_root)
    data = load_json_file(path, "LLaVA data file")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of samples, got {type_name(data)}")
    samples = []
    for index, item in enumerate(data):
        where = f"{path}: [{index}]"
        item = json_object(item, where)
        turns = []
        for j, turn in enumerate(list_field(item, "conversations", where)):
            turn_where = f"{where}.conversations[{j}]"
            turn = json_object(turn, turn_where)
            speaker = string_field(turn, "from", turn_where)
            if speaker not in ("human", "gpt"):
                raise UserError(f"{turn_where}.from: expected 'human' or 'gpt', got {speaker!r}")
            turns.append((speaker, string_field(turn, "value", turn_where)))
        if not turns:
            raise UserError(f"{where}.conversations: empty")
        samples.append(LlavaSample(id_field(item, "id", where) if "id" in item else index,
                                   _images_field(item, image_root, where, check_images), turns))
    return samples


class LlavaQuestion(NamedTuple):
    question_id: int | str
    images: tuple[Path, ...]
    text: str
    extra: dict              # every other field (category, label, ...)


def read_llava_questions(path: str | Path, image_root: str | Path,
                         check_images: bool = True) -> list[LlavaQuestion]:
    """LLaVA evaluation questions (JSONL ``{"question_id", "image"?, "text", ...}``)."""
    _check_image_root(image_root)
    questions, seen = [], set()
    for line, raw in iter_jsonl(path, "LLaVA question file"):
        where = f"{path}:{line}"
        raw = json_object(raw, where)
        qid = id_field(raw, "question_id", where)
        if qid in seen:
            raise UserError(f"{where}.question_id: duplicate question id {qid!r}")
        seen.add(qid)
        extra = {k: v for k, v in raw.items() if k not in ("question_id", "image", "text")}
        questions.append(LlavaQuestion(qid, _images_field(raw, image_root, where, check_images),
                                       string_field(raw, "text", where), extra))
    return questions
