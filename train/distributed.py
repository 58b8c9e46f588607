"""Launcher-agnostic process-group setup, rank-0 printing, per-rank seeding and RNG state.

The same training script runs under ``deepspeed --num_gpus N``, ``torchrun --nproc_per_node N``
or as a plain single process (``python train/x.py``, or inside pytest). Both launchers export
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them we fill in a
one-process world on a free local port, because otherwise ``deepspeed.init_distributed`` goes
looking for MPI (mpi4py) to discover the world.

``deepspeed`` is imported lazily so that helpers such as :func:`find_free_port` stay cheap to
import (the tests use them from the parent process).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmcore.errors import UserError

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and which device/backend it uses."""
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; tiny race, fine for local jobs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def torchrun_command(script: str, *args: str, nproc: int = 2) -> list[str]:
    """The command that launches ``script`` on ``nproc`` local processes with ``torch.distributed.run``
    (this Python, a free rendezvous port): the demo's and the ablation's way to start a trainer."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(find_free_port()), script, *args]


def default_backend() -> str:
    """nccl on CUDA machines, gloo on CPU (DeepSpeed's CPU default, ccl, is not installed)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def ensure_dist_env() -> None:
    """Fill in a one-process world when no launcher set the env; reject a half-set env."""
    present = [key for key in _ENV_KEYS if key in os.environ]
    if not present:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
        return
    missing = [key for key in _ENV_KEYS if key not in os.environ]
    if missing:
        raise UserError(f"launcher environment is incomplete: {', '.join(present)} set but "
                        f"{', '.join(missing)} missing")
    # A launcher always sets the rendezvous address; a hand-made env may not.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if _env_int("WORLD_SIZE") > 1:
            raise UserError("MASTER_PORT is not set for a multi-process job")
        os.environ["MASTER_PORT"] = str(find_free_port())


def use_interpreter_ninja(environ: dict | None = None, executable: str | None = None) -> bool:
    """Put this interpreter's ``bin`` directory first on ``PATH`` when it holds ``ninja``.

    torch JIT-builds DeepSpeed's shared-memory comm op with the first ``ninja`` on ``PATH``, and
    ninja versions hash the build commands differently: measured here (session 22), the venv's
    ninja 1.13 (a shell with the venv activated) and the system's 1.11 (``make``, which runs
    ``.venv/bin/python`` without activating) each took the other's build for stale and rebuilt it,
    ~60 s on this 2-core machine, every time the two alternated. One ninja, the environment's own,
    builds it once. ``environ`` / ``executable`` default to ``os.environ`` / ``sys.executable``;
    returns whether ``PATH`` changed.
    """
    environ = os.environ if environ is None else environ
    bin_dir = str(Path(executable or sys.executable).parent)
    if not (Path(bin_dir) / "ninja").is_file():
        return False
    parts = environ.get("PATH", "").split(os.pathsep) if environ.get("PATH") else []
    if parts and parts[0] == bin_dir:
        return False
    environ["PATH"] = os.pathsep.join([bin_dir, *parts])
    return True


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialise the process group through DeepSpeed (idempotent) and return this rank's info."""
    ensure_dist_env()
    backend = backend or default_backend()
    local_rank = _env_int("LOCAL_RANK")
    if backend == "nccl":
        # Pin the device before the first collective so NCCL does not put every rank on cuda:0.
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    _limit_cpu_threads(backend)
    # DeepSpeed 0.19 calls torch.distributed functions that torch 2.13 deprecates; the warning
    # comes from inside DeepSpeed on every collective and is not actionable here.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    if not dist.is_initialized():
        import deepspeed  # deferred: see the module docstring

        use_interpreter_ninja()  # before DeepSpeed builds or loads an op
        # DeepSpeed's shared-memory all-reduce op serves only inference_all_reduce (AutoTP
        # inference), which nothing here calls: training collectives go through gloo either way.
        # Left on, it is JIT-compiled on first use (~50 s with g++ 12: a fresh clone's `make demo`
        # spent 83 s in its first DeepSpeed step against 24 s with the build cached, session 24),
        # and every CPU rank maps a 67 MB /dev/shm workspace that DeepSpeed never unlinks (before
        # session 24 each rank unlinked its own after a barrier). tests/test_deepspeed_cpu.py
        # fails if the op is built or a workspace is left behind.
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=local_rank, backend=backend, device=device)


SHM_COMM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME in deepspeed.ops.op_builder.cpu.comm


def _limit_cpu_threads(backend: str) -> None:
    """Split the cores between the ranks of one machine unless OMP_NUM_THREADS says otherwise.

    torchrun sets OMP_NUM_THREADS=1 itself, the deepspeed launcher does not: N ranks each using
    every core oversubscribe the CPU and run several times slower.
    """
    if backend != "gloo" or "OMP_NUM_THREADS" in os.environ:
        return
    local_size = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    threads = max(1, (os.cpu_count() or 1) // max(1, int(local_size)))
    torch.set_num_threads(threads)


def shutdown_distributed() -> None:
    """Tear the process group down so the process exits without gloo/NCCL warnings."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def print_rank0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only, flushed so launcher-multiplexed output keeps its order."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float) -> float:
    """Average a Python scalar over ranks (e.g. a loss for logging)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def all_ranks_true(flag: bool) -> bool:
    """True only when ``flag`` holds on every rank (so all ranks agree on pass/fail)."""
    if not dist.is_initialized():
        return bool(flag)
    tensor = torch.tensor([0 if flag else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.item() == 0


def set_seed(seed: int, rank: int | None = None) -> int:
    """Seed python/numpy/torch; with ``rank`` the seed is offset so ranks draw different streams.

    Call ``set_seed(seed)`` before building a model (identical weights on every rank) and
    ``set_seed(seed, rank)`` before training (different dropout/sampling per rank). Returns the
    seed actually used.
    """
    effective = seed + (rank or 0) * 1_000_003  # a prime stride keeps per-rank streams apart
    random.seed(effective)
    np.random.seed(effective % 2**32)
    torch.manual_seed(effective)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(effective)
    return effective


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and, when present, CUDA).

    Only tensors, ints, floats, strings and tuples, so the file loads with
    ``torch.load(weights_only=True)`` (no pickle execution on resume).
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def add_launcher_args(parser) -> None:
    """Accept the ``--local_rank=N`` the deepspeed launcher appends (the env var is used instead)."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)


def warn(message: str) -> None:
    """A warning every rank prints, prefixed with its rank (for per-rank conditions)."""
    print(f"[rank {get_rank()}] warning: {message}", file=sys.stderr, flush=True)
