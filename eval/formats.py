"""Real benchmark formats: readers for VQAv2, COCO captions, GenEval prompt lists and LLaVA data,
and LLaVA's answer-file JSONL with a resumable writer.

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
* **LLaVA answer files**, JSONL ``{"question_id", "prompt", "text", "answer_id", "model_id",
  "metadata"}``, written by :class:`AnswerWriter`, which resumes an interrupted file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any, Hashable, Iterable, Iterator, NamedTuple

from mmcore.errors import UserError
from mmcore.io import atomic_write_text, read_json

log = logging.getLogger(__name__)

ANSWER_FIELDS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")
GENEVAL_ITEM_FIELDS = {"class", "count", "color", "position", "size"}
GENEVAL_ALIASES = {"shape": "class", "colour": "color"}   # ShapesWorld spelling -> GenEval's


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def load_json_file(path: str | Path, what: str) -> Any:
    """Parsed JSON of ``path``; a missing file or invalid JSON is a UserError naming it."""
    return read_json(path, what)


def iter_jsonl(path: str | Path, what: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed object)`` for every non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{number}: invalid JSON ({err.msg})") from err
                except RecursionError:
                    raise UserError(f"{path}:{number}: invalid JSON (nested too deeply)") from None
    except UnicodeDecodeError as err:  # raised by the line iterator
        raise UserError(f"{path}: not UTF-8 text ({err})") from None


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object, got {_type_name(value)}")
    return value


def _list(container: dict, key: str, where: str) -> list:
    if key not in container:
        raise UserError(f"{where}: missing field {key!r}")
    value = container[key]
    if not isinstance(value, list):
        raise UserError(f"{where}.{key}: expected a list, got {_type_name(value)}")
    return value


def _string(container: dict, key: str, where: str, optional: bool = False) -> str | None:
    if key not in container or (optional and container[key] is None):
        if optional:
            return None
        raise UserError(f"{where}: missing field {key!r}")
    value = container[key]
    if not isinstance(value, str):
        raise UserError(f"{where}.{key}: expected a string, got {_type_name(value)}")
    return value


def _identifier(container: dict, key: str, where: str) -> int | str:
    """An id field: an integer or a string (never a bool, float or null)."""
    if key not in container:
        raise UserError(f"{where}: missing field {key!r}")
    value = container[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{where}.{key}: expected an integer or string, got {_type_name(value)}")
    return value


def _positive_int(container: dict, key: str, where: str) -> int:
    value = container.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}.{key}: expected a positive integer, got {value!r}")
    return value


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
    data = _object(load_json_file(path, "VQAv2 annotation file"), str(path))
    annotations = {}
    for index, item in enumerate(_list(data, "annotations", str(path))):
        where = f"{path}: annotations[{index}]"
        item = _object(item, where)
        qid = _identifier(item, "question_id", where)
        if qid in annotations:
            raise UserError(f"{where}.question_id: duplicate question id {qid!r}")
        answers = []
        for j, answer in enumerate(_list(item, "answers", where)):
            answers.append(_string(_object(answer, f"{where}.answers[{j}]"), "answer", f"{where}.answers[{j}]"))
        if not answers:
            raise UserError(f"{where}.answers: no answers")
        annotations[qid] = (_identifier(item, "image_id", where), answers,
                            _string(item, "multiple_choice_answer", where, optional=True),
                            _string(item, "answer_type", where, optional=True),
                            _string(item, "question_type", where, optional=True))
    return annotations


def read_vqav2(questions_path: str | Path, annotations_path: str | Path | None = None) -> list[VQAQuestion]:
    """VQAv2 questions, joined with their annotations when an annotation file is given (the two
    must cover the same question ids with the same image ids)."""
    data = _object(load_json_file(questions_path, "VQAv2 question file"), str(questions_path))
    subtype = _string(data, "data_subtype", str(questions_path), optional=True)
    annotations = _read_vqa_annotations(annotations_path) if annotations_path is not None else None
    questions, seen = [], set()
    for index, item in enumerate(_list(data, "questions", str(questions_path))):
        where = f"{questions_path}: questions[{index}]"
        item = _object(item, where)
        qid = _identifier(item, "question_id", where)
        image_id = _identifier(item, "image_id", where)
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
        questions.append(VQAQuestion(qid, image_id, _string(item, "question", where), image_file, *extra))
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
    data = _object(load_json_file(path, "COCO caption file"), str(path))
    images: dict = {}
    for index, item in enumerate(_list(data, "images", str(path))):
        where = f"{path}: images[{index}]"
        item = _object(item, where)
        image_id = _identifier(item, "id", where)
        if image_id in images:
            raise UserError(f"{where}.id: duplicate image id {image_id!r}")
        images[image_id] = CocoImage(image_id, _string(item, "file_name", where), [])
    if "annotations" in data:
        for index, item in enumerate(_list(data, "annotations", str(path))):
            where = f"{path}: annotations[{index}]"
            item = _object(item, where)
            image_id = _identifier(item, "image_id", where)
            if image_id not in images:
                raise UserError(f"{where}.image_id: image {image_id!r} is not listed in 'images'")
            images[image_id].captions.append(_string(item, "caption", where).strip())
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
    raw = _object(raw, where)
    item = {}
    for name, value in raw.items():
        canonical = GENEVAL_ALIASES.get(name, name)
        if canonical not in GENEVAL_ITEM_FIELDS:
            raise UserError(f"{where}: unknown field {name!r} (known: class/shape, count, "
                            f"color/colour, position, size)")
        if canonical in item:
            raise UserError(f"{where}: field {canonical!r} given twice (as {name!r})")
        item[canonical] = value
    _string(item, "class", where)
    item["count"] = _positive_int(item, "count", where) if "count" in item else 1
    for name in ("color", "size"):
        _string(item, name, where, optional=True)
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
    raw = _object(raw, where)
    include = [_geneval_item(x, f"{where}.include[{i}]") for i, x in enumerate(_list(raw, "include", where))]
    if not include:
        raise UserError(f"{where}.include: empty; a prompt must ask for at least one object")
    exclude = ([_geneval_item(x, f"{where}.exclude[{i}]") for i, x in enumerate(_list(raw, "exclude", where))]
               if "exclude" in raw else [])
    return GenEvalPrompt(prompt=_string(raw, "prompt", where), tag=_string(raw, "tag", where, optional=True) or "",
                         include=include, exclude=exclude, key=_string(raw, "key", where, optional=True))


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
        raise UserError(f"{path}: expected a JSON list of samples, got {_type_name(data)}")
    samples = []
    for index, item in enumerate(data):
        where = f"{path}: [{index}]"
        item = _object(item, where)
        turns = []
        for j, turn in enumerate(_list(item, "conversations", where)):
            turn_where = f"{where}.conversations[{j}]"
            turn = _object(turn, turn_where)
            speaker = _string(turn, "from", turn_where)
            if speaker not in ("human", "gpt"):
                raise UserError(f"{turn_where}.from: expected 'human' or 'gpt', got {speaker!r}")
            turns.append((speaker, _string(turn, "value", turn_where)))
        if not turns:
            raise UserError(f"{where}.conversations: empty")
        samples.append(LlavaSample(_identifier(item, "id", where) if "id" in item else index,
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
        raw = _object(raw, where)
        qid = _identifier(raw, "question_id", where)
        if qid in seen:
            raise UserError(f"{where}.question_id: duplicate question id {qid!r}")
        seen.add(qid)
        extra = {k: v for k, v in raw.items() if k not in ("question_id", "image", "text")}
        questions.append(LlavaQuestion(qid, _images_field(raw, image_root, where, check_images),
                                       _string(raw, "text", where), extra))
    return questions


# ---------------------------------------------------------------------------------------------
# LLaVA answer files
# ---------------------------------------------------------------------------------------------

def answer_id_for(model_id: str, question_id: int | str) -> str:
    """Deterministic answer id (LLaVA uses a random shortuuid; a derived one keeps a resumed file
    identical to an uninterrupted one)."""
    digest = hashlib.sha256(json.dumps([model_id, question_id]).encode("utf-8")).hexdigest()
    return digest[:22]


def parse_answer_record(raw: Any, where: str) -> dict:
    """One answer line, validated: all six LLaVA fields with the right types."""
    raw = _object(raw, where)
    _identifier(raw, "question_id", where)
    for name in ("prompt", "text", "answer_id", "model_id"):
        _string(raw, name, where)
    if not isinstance(raw.get("metadata"), dict):
        raise UserError(f"{where}.metadata: expected a JSON object, got {_type_name(raw.get('metadata'))}")
    return raw


def read_answer_file(path: str | Path) -> list[dict]:
    """Every record of a complete LLaVA answer file."""
    return [parse_answer_record(raw, f"{path}:{line}") for line, raw in iter_jsonl(path, "answer file")]


class AnswerWriter:
    """Append-only LLaVA answer file that survives interruption.

    Each :meth:`write` appends one line and flushes + fsyncs it, so a stop loses at most the line
    being written. Opening an existing file reads its complete lines, drops a torn last line (no
    trailing newline: the write that was cut off), and remembers the finished question ids;
    :meth:`is_done` tells the caller what to skip. Writing the remaining answers in the same order
    therefore gives the same bytes as an uninterrupted run. A file written for another
    ``model_id`` is refused, and so is a second writer on the same file (an exclusive lock).
    """

    def __init__(self, path: str | Path, model_id: str):
        if not model_id:
            raise ValueError("model_id must be a non-empty string")
        self.path, self.model_id = Path(path), model_id
        self.done: set = set()
        self.resumed = 0                        # answers found on disk when opened
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a+b")
        try:
            self._lock()
            self._load_existing()
        except BaseException:
            self._handle.close()
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the rest still holds
            return
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise UserError(f"answer file {self.path} is being written by another process") from err

    def _load_existing(self) -> None:
        """Read the finished answers; drop a torn last line only once the file is known to be
        this model's (another model's file is refused untouched)."""
        self._handle.seek(0)
        data = self._handle.read()
        complete = data[:data.rfind(b"\n") + 1]
        try:
            text = complete.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{self.path}: not UTF-8 text ({err}); the answer file is corrupt") from err
        for number, line in enumerate(text.split("\n")[:-1], start=1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                record = parse_answer_record(json.loads(line), where)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: invalid JSON ({err.msg}); the answer file is corrupt") from err
            except RecursionError:
                raise UserError(f"{where}: invalid JSON (nested too deeply); the answer file is corrupt") from None
            if record["model_id"] != self.model_id:
                raise UserError(f"answer file from another model: {where} has model_id "
                                f"{record['model_id']!r}, this run's model is {self.model_id!r}; "
                                f"choose another answers path or remove the file")
            if record["question_id"] in self.done:
                raise UserError(f"{where}: question {record['question_id']!r} is answered twice")
            self.done.add(record["question_id"])
        self.resumed = len(self.done)
        if len(complete) < len(data):
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run",
                        self.path, len(data) - len(complete))
            self._handle.truncate(len(complete))
            self._sync()

    def is_done(self, question_id: Hashable) -> bool:
        return question_id in self.done

    def write(self, question_id: int | str, prompt: str, text: str, metadata: dict | None = None) -> dict:
        """Append one finished answer (flushed and fsynced) and return its record."""
        if question_id in self.done:
            raise ValueError(f"question {question_id!r} is already answered in {self.path}")
        record = {"question_id": question_id, "prompt": prompt, "text": text,
                  "answer_id": answer_id_for(self.model_id, question_id), "model_id": self.model_id,
                  "metadata": metadata or {}}
        parse_answer_record(record, f"answer to question {question_id!r}")
        self._handle.write((json.dumps(record) + "\n").encode("utf-8"))
        self._sync()
        self.done.add(question_id)
        return record

    def _sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def __enter__(self) -> "AnswerWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
