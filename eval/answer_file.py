"""LLaVA answer files: JSONL ``{"question_id", "prompt", "text", "answer_id", "model_id",
"metadata"}``, read and validated, and written by :class:`AnswerWriter`, which resumes an
interrupted file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Hashable

from eval.json_fields import id_field, iter_jsonl, json_object, string_field, type_name
from mmcore.errors import UserError

log = logging.getLogger(__name__)

ANSWER_FIELDS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


def answer_id_for(model_id: str, question_id: int | str) -> str:
    """Deterministic answer id (LLaVA uses a random shortuuid; a derived one keeps a resumed file
    identical to an uninterrupted one)."""
    digest = hashlib.sha256(json.dumps([model_id, question_id]).encode("utf-8")).hexdigest()
    return digest[:22]


def parse_answer_record(raw: Any, where: str) -> dict:
    """One answer line, validated: all six LLaVA fields with the right types."""
    raw = json_object(raw, where)
    id_field(raw, "question_id", where)
    for name in ("prompt", "text", "answer_id", "model_id"):
        string_field(raw, name, where)
    if not isinstance(raw.get("metadata"), dict):
        raise UserError(f"{where}.metadata: expected a JSON object, got {type_name(raw.get('metadata'))}")
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
