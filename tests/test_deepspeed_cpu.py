"""Two-process DeepSpeed smoke runs on CPU (gloo): ZeRO-2 and ZeRO-3, one per launcher.

Each case launches ``train/lm_smoke.py`` as a subprocess, exactly as a user would, and checks
its ``summary.json``: training lowered the loss, resume-from-checkpoint equals the continuous
run, and the consolidated fp32 weights equal the trained ones.

Measured on the 2-core dev box (30 steps): 10-14 s per case with a warm extension cache, the
deepspeed-launcher case ~3 s slower (its runner and launch processes import deepspeed too);
training itself is ~1 s, the rest is process start-up and imports. The very first case in a
checkout also JIT-compiles DeepSpeed's shared-memory comm op into TORCH_EXTENSIONS_DIR: that
case took 52 s cold (whole file 66 s cold, 24-28 s warm). The cache dir is the Makefile's, so
the compile happens once per checkout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.distributed import find_free_port, use_interpreter_ninja

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "train/lm_smoke.py"
CONFIG = "configs/smoke/lm_smoke.yaml"
TIMEOUT_S = 600  # generous: a run takes ~15-25 s


def _launcher(name: str, module: str) -> list[str]:
    """The venv's console script when present, else the same entry point via ``python -m``."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.is_file() else [sys.executable, "-m", module]


def torchrun_cmd(port: int) -> list[str]:
    return [*_launcher("torchrun", "torch.distributed.run"),
            "--nproc_per_node", "2", "--master_port", str(port)]


def deepspeed_cmd(port: int) -> list[str]:
    return [*_launcher("deepspeed", "deepspeed.launcher.runner"),
            "--num_gpus", "2", "--master_port", str(port)]


def smoke_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Same cache as the Makefile, so the comm op is compiled once per checkout, not per test.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    # torchrun leaves torchelastic_* directories in the temp dir: keep them in tmp_path.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    # The deepspeed launcher does not limit threads; 2 ranks x all cores would oversubscribe.
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # A launcher in the parent env would make the children think they are one rank of it.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("launcher, stage", [("torchrun", 3), ("deepspeed", 2)])
def test_two_process_smoke(tmp_path: Path, launcher: str, stage: int) -> None:
    out_dir = tmp_path / "run"
    port = find_free_port()
    launch = {"torchrun": torchrun_cmd, "deepspeed": deepspeed_cmd}[launcher](port)
    cmd = [*launch, SCRIPT, "--config", CONFIG,
           f"engine.deepspeed_config=configs/deepspeed/zero{stage}.json", f"out_dir={out_dir}"]
    # an empty extensions cache: DeepSpeed must not JIT-build its shared-memory all-reduce op
    # (train.distributed.init_distributed turns it off; building it took ~50 s here)
    env = {**smoke_env(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output}"

    summary = json.loads((out_dir / "summary.json").read_text())
    failed = [c for c in summary["checks"] if not c["passed"]]
    assert summary["all_passed"] and not failed, failed
    assert {c["name"] for c in summary["checks"]} >= {
        "loss_decreased", "params_after_load", "resume_loss_matches",
        "params_after_resumed_step", "consolidated_equals_trained"}
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage
    # The synthetic task is learnable: from ln(256) ~ 5.5 down by well over a nat in 30 steps.
    assert summary["last_loss"] < summary["first_loss"] - 1.0, summary
    losses = [json.loads(line) for line in (out_dir / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == summary["steps"]
    assert (out_dir / "consolidated" / "model.safetensors").is_file()
    assert (out_dir / "config.yaml").is_file()
    # DeepSpeed's CPU all-reduce op would leave a ~67 MB /dev/shm file per rank
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"shared-memory buffers left behind: {leaked}"
    assert "shm_comm_op built" not in output and not list((tmp_path / "extensions").glob("**/*shm*"))


def test_the_interpreters_ninja_goes_first_on_path(tmp_path: Path) -> None:
    """DeepSpeed's comm op is built by the first ninja on PATH; two ninja versions rebuild each
    other's build (train.distributed.use_interpreter_ninja), so the environment's own must win."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    environ = {"PATH": os.pathsep.join(["/usr/local/bin", "/usr/bin"])}
    assert not use_interpreter_ninja(environ, str(python))  # no ninja there: PATH untouched
    assert environ["PATH"] == os.pathsep.join(["/usr/local/bin", "/usr/bin"])
    (bin_dir / "ninja").write_text("")
    assert use_interpreter_ninja(environ, str(python))
    assert environ["PATH"].split(os.pathsep) == [str(bin_dir), "/usr/local/bin", "/usr/bin"]
    assert not use_interpreter_ninja(environ, str(python))  # already first: not added twice
    assert environ["PATH"].split(os.pathsep) == [str(bin_dir), "/usr/local/bin", "/usr/bin"]
    empty: dict[str, str] = {}
    assert use_interpreter_ninja(empty, str(python)) and empty["PATH"] == str(bin_dir)
