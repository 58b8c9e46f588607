"""Atomic writes: nothing half-written on failure, normal permissions on success."""
import os
import stat

import pytest

from mmcore.io import FILE_MODE, atomic_output_dir, atomic_output_path, atomic_write_text


def test_failed_write_leaves_previous_file(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_output_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]  # temporary file cleaned up


def test_output_dir_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    with atomic_output_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic_output_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError
    assert sorted(os.listdir(target)) == ["a"] and sorted(os.listdir(tmp_path)) == ["export"]


def test_written_files_are_not_private(tmp_path):
    path = atomic_write_text(tmp_path / "f", "x")
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE
    with atomic_output_path(tmp_path / "g") as tmp:
        tmp.write_text("y")
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) == FILE_MODE
