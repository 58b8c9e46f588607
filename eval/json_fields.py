"""Reading JSON and JSONL input files with errors that name the file, line and field.

Shared by the benchmark readers (:mod:`eval.formats`) and the answer files
(:mod:`eval.answer_file`): each check raises :class:`mmcore.errors.UserError` with a message such
as ``vqa_q.json: questions[3].question_id: expected an integer or string, got null``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from mmcore.errors import UserError
from mmcore.io import read_json


def type_name(value: Any) -> str:
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


def json_object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object, got {type_name(value)}")
    return value


def list_field(container: dict, key: str, where: str) -> list:
    if key not in container:
        raise UserError(f"{where}: missing field {key!r}")
    value = container[key]
    if not isinstance(value, list):
        raise UserError(f"{where}.{key}: expected a list, got {type_name(value)}")
    return value


def string_field(container: dict, key: str, where: str, optional: bool = False) -> str | None:
    if key not in container or (optional and container[key] is None):
        if optional:
            return None
        raise UserError(f"{where}: missing field {key!r}")
    value = container[key]
    if not isinstance(value, str):
        raise UserError(f"{where}.{key}: expected a string, got {type_name(value)}")
    return value


def id_field(container: dict, key: str, where: str) -> int | str:
    """An id field: an integer or a string (never a bool, float or null)."""
    if key not in container:
        raise UserError(f"{where}: missing field {key!r}")
    value = container[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{where}.{key}: expected an integer or string, got {type_name(value)}")
    return value


def positive_int_field(container: dict, key: str, where: str) -> int:
    value = container.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}.{key}: expected a positive integer, got {value!r}")
    return value
