"""Crash-safe checkpoint bookkeeping without DeepSpeed processes (completion markers, fallback
when ``latest`` is stale, rotation, leftovers: :mod:`train.checkpoint_dirs`) and weights-only
checkpoint loading (:func:`train.ds_engine.weights_only_loading`). The kill -9 runs that rely on
them are in tests/test_faults.py."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from train import checkpoint_dirs as dirs


def fake_checkpoint(checkpoints: Path, step: int, complete: bool = True) -> Path:
    directory = checkpoints / dirs.checkpoint_tag(step)
    directory.mkdir(parents=True)
    (directory / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    if complete:
        dirs.write_complete_marker(directory, directory.name, step)
    return directory


def test_resume_picks_newest_complete_checkpoint(tmp_path):
    ck = tmp_path / "checkpoints"
    assert dirs.find_latest_tag(ck) is None
    for step in (2, 4, 6):
        fake_checkpoint(ck, step)
    (ck / "latest").write_text("step_00000004")
    assert dirs.find_latest_tag(ck) == "step_00000004"  # latest wins while it is complete
    (ck / "latest").write_text("step_00000008")  # points at nothing
    assert dirs.find_latest_tag(ck) == "step_00000006"
    (ck / "latest").unlink()
    assert dirs.find_latest_tag(ck) == "step_00000006"
    (ck / "latest").write_text("../../etc")  # never leaves the directory
    assert dirs.find_latest_tag(ck) == "step_00000006"
    # a truncated file makes the checkpoint incomplete; a step dir without marker is ignored
    (ck / "step_00000006" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    fake_checkpoint(ck, 7, complete=False)
    (ck / ".partial-step_00000010").mkdir()
    assert dirs.find_latest_tag(ck) == "step_00000004"
    assert dirs.latest_tag(ck) == "step_00000004"
    assert dirs.clean_partial_checkpoints(ck) == [".partial-step_00000010"]
    # legacy checkpoint (no marker) is trusted only when latest names it
    (ck / "latest").write_text("step_00000007")
    assert dirs.find_latest_tag(ck) == "step_00000007"


def test_rotation_keeps_last_n_and_drops_abandoned_timeline(tmp_path):
    ck = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 12):
        fake_checkpoint(ck, step)
    removed = dirs.rotate_checkpoints(ck, keep_last=2, current_step=8)
    assert sorted(removed) == ["step_00000002", "step_00000004", "step_00000012"]
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_00000006", "step_00000008"]
    assert dirs.rotate_checkpoints(ck, keep_last=0, current_step=8) == []


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    import torch

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from train import ds_engine
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"x": Exploit()}, handle, protocol=2)
    # DeepSpeed's own checkpoint reader, which asks torch for a full (unsafe) unpickle: the block
    # must override that and load weights only
    engine = TorchCheckpointEngine()
    with ds_engine.weights_only_loading():
        with pytest.raises(pickle.UnpicklingError):
            engine.load(str(path), map_location="cpu")
    assert torch.load is not None and "safe_load" not in torch.load.__name__  # restored afterwards
    with ds_engine.weights_only_loading():
        assert engine.load(str(_tensor_file(tmp_path)), map_location="cpu")["w"].shape == (2,)  # tensors still load


def _tensor_file(tmp_path: Path) -> Path:
    import torch
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.zeros(2)}, path)
    return path


class GetattrPickle:
    """Pickles as ``getattr(owner, name)``: how Python 3.11.2 pickles an enum member (a ZeRO
    checkpoint's ``ZeroStageEnum``), whatever Python runs the test."""

    def __init__(self, owner, name: str):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return (getattr, (self.owner, self.name))


def test_checkpoint_loading_accepts_enum_members_pickled_by_getattr_and_nothing_else(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from train import ds_engine

    def load(value):
        path = tmp_path / "state.pt"
        torch.save({"stage": value}, path)
        with ds_engine.weights_only_loading():
            return torch.load(path, map_location="cpu", weights_only=True)["stage"]

    assert load(GetattrPickle(ZeroStageEnum, "gradients")) is ZeroStageEnum.gradients
    assert load(ZeroStageEnum.weights) is ZeroStageEnum.weights  # this Python's own way
    # the narrowed getattr reaches members of allow-listed enums only: never a method's globals
    for owner, name in ((LossScaler, "__init__"), (ZeroStageEnum, "__class__"), (ZeroStageEnum, "_member_map_")):
        with pytest.raises(pickle.UnpicklingError):
            load(GetattrPickle(owner, name))
