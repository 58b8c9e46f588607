"""Checkpoint directories: step tags, completion markers, the ``latest`` pointer, rotation.

The deepspeed-free half of :mod:`train.ds_engine`'s crash-safe checkpoints (that module writes and
reads the engine state; this one decides which directories count). A checkpoint is complete when
its ``checkpoint_complete.json`` (written last, before the directory got its final name) lists
files that all exist with the recorded sizes; ``.partial-*`` and ``.trash-*`` directories are
leftovers of interrupted saves and rotations. :mod:`train.ds_engine` re-exports every public name.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch.distributed as tdist

from mmcore.errors import UserError
from mmcore.io import atomic_write_json
from train.distributed import get_rank, warn

LATEST_FILE = "latest"  # DeepSpeed's pointer file, written by us (atomically, after the rename)
PARTIAL_PREFIX = ".partial-"  # a checkpoint being written
TRASH_PREFIX = ".trash-"  # a checkpoint being deleted
COMPLETE_FILE = "checkpoint_complete.json"  # written last into a finished checkpoint
_TAG_RE = re.compile(r"^step_(\d+)$")


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int | None:
    """The step of a ``step_XXXXXXXX`` tag, None for any other name."""
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def rng_file(checkpoint_dir: Path, tag: str, rank: int) -> Path:
    return Path(checkpoint_dir) / tag / f"rng_state_rank{rank:05d}.pt"


def fsync_path(path: Path) -> None:
    """Flush a file's (or directory's) data to disk; best effort (some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_checkpoint_dir(path: Path) -> None:
    """Delete a checkpoint directory: renamed to ``.trash-*`` first (atomic), then removed, so a
    kill half-way through the deletion never leaves a half-deleted ``step_*`` behind."""
    if not path.exists():
        return
    trash = path
    if not path.name.startswith((PARTIAL_PREFIX, TRASH_PREFIX)):
        trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_complete_marker(directory: Path, tag: str, step: int) -> None:
    """Record every file of a fully written checkpoint with its size (see :func:`is_complete`)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != COMPLETE_FILE:
            fsync_path(path)
            files[path.relative_to(directory).as_posix()] = path.stat().st_size
    world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
    atomic_write_json(directory / COMPLETE_FILE, {"tag": tag, "step": step, "world_size": world,
                                                  "files": files, "saved_at": time.time()})
    fsync_path(directory / COMPLETE_FILE)
    fsync_path(directory)


def is_complete(directory: str | Path) -> bool:
    """Whether a checkpoint directory was fully written: its ``checkpoint_complete.json`` (written
    last, just before the directory got its final name) lists files that all exist with the
    recorded sizes."""
    marker = Path(directory) / COMPLETE_FILE
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        files = record["files"]
        return isinstance(files, dict) and bool(files) and all(
            (Path(directory) / name).is_file() and (Path(directory) / name).stat().st_size == size
            for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _is_legacy_checkpoint(directory: Path) -> bool:
    """A checkpoint written before completion markers existed (then only ``latest`` vouched for it)."""
    return directory.is_dir() and not (directory / COMPLETE_FILE).exists() \
        and any(directory.glob("*model_states.pt"))


def complete_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, str]]:
    """``(step, tag)`` of every complete ``step_*`` checkpoint, oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        step = step_of_tag(path.name)
        if step is not None and path.is_dir() and is_complete(path):
            found.append((step, path.name))
    return sorted(found)


def _read_latest(checkpoint_dir: Path) -> str | None:
    try:
        tag = (checkpoint_dir / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    # a plain directory name only: a hand-edited or corrupt pointer never leaves checkpoint_dir
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or tag.startswith("."):
        return None
    return tag


def latest_tag(checkpoint_dir: str | Path) -> str:
    """The checkpoint to resume from: what ``latest`` names when that directory is complete, else
    the newest complete ``step_*`` directory (``.partial-*`` leftovers never count).

    Not a collective (offline tools use it); trainers call :func:`resume_checkpoint_tag`.
    """
    tag = find_latest_tag(checkpoint_dir)
    if tag is None:
        raise UserError(f"no complete checkpoint in {checkpoint_dir}")
    return tag


def find_latest_tag(checkpoint_dir: str | Path) -> str | None:
    """:func:`latest_tag`, or None when ``checkpoint_dir`` holds no complete checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    pointed = _read_latest(checkpoint_dir)
    if pointed is not None:
        directory = checkpoint_dir / pointed
        if is_complete(directory) or _is_legacy_checkpoint(directory):
            return pointed
    complete = complete_checkpoints(checkpoint_dir)
    if not complete:
        return None
    tag = complete[-1][1]
    if pointed is not None or (checkpoint_dir / LATEST_FILE).exists():
        warn(f"{checkpoint_dir / LATEST_FILE} names {pointed!r}, which is missing or incomplete; "
             f"using the newest complete checkpoint {tag}")
    return tag


def clean_partial_checkpoints(checkpoint_dir: str | Path) -> list[str]:
    """Delete ``.partial-*`` / ``.trash-*`` leftovers of interrupted saves and rotations."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    removed = []
    for path in sorted(checkpoint_dir.iterdir()):
        if path.is_dir() and path.name.startswith((PARTIAL_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def resume_checkpoint_tag(checkpoint_dir: str | Path) -> str | None:
    """The tag to resume from (None: start fresh), decided by rank 0 and shared with every rank.

    Rank 0 also removes leftovers of interrupted saves. A collective when a process group exists.
    """
    tag = None
    if get_rank() == 0:
        removed = clean_partial_checkpoints(checkpoint_dir)
        if removed:
            warn(f"removed unfinished checkpoint directories in {checkpoint_dir}: {', '.join(removed)}")
        tag = find_latest_tag(checkpoint_dir)
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        box = [tag]
        tdist.broadcast_object_list(box, src=0)
        tag = box[0]
    return tag


def rotate_checkpoints(checkpoint_dir: str | Path, keep_last: int, current_step: int) -> list[str]:
    """Keep the ``keep_last`` newest complete checkpoints up to ``current_step``; delete the rest.

    Complete checkpoints *newer* than ``current_step`` belong to an abandoned timeline (a rerun
    with resume=false, or a resume from an older ``latest``) and are deleted too, so that a later
    fallback can never jump onto them. ``keep_last=0`` keeps everything.
    """
    if keep_last <= 0:
        return []
    complete = complete_checkpoints(checkpoint_dir)
    stale = [tag for step, tag in complete if step > current_step]
    kept = [tag for step, tag in complete if step <= current_step]
    doomed = stale + kept[:-keep_last]
    for tag in doomed:
        remove_checkpoint_dir(Path(checkpoint_dir) / tag)
    return doomed
