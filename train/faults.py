"""Fault handling shared by the trainers: non-finite steps, too much bad data, test-only fault hooks.

**Non-finite steps** (:class:`StepGuard`). Every micro-batch's loss is checked on every rank and
the verdict is agreed with one all-reduce, so all ranks skip the same optimizer step together:

* a non-finite loss on the *first* micro-batch of a step: no rank runs backward or
  ``engine.step()`` for that step (nothing was accumulated, so nothing has to be undone; DeepSpeed's
  step counter and LR schedule do not advance);
* a non-finite loss on a later micro-batch (``grad_accum_steps > 1``, earlier micro-batches already
  accumulated): the remaining backward passes get a NaN loss, so DeepSpeed's ZeRO overflow check
  (an all-reduce of the gradient norm) discards the whole accumulated step and zeroes the
  gradients; the guard checks that it did (``engine.was_step_applied()``);
* a finite loss with non-finite gradients: the ZeRO optimizers (stages 1-3, fp32 and bf16) refuse
  the step themselves; the guard sees ``was_step_applied() == False`` and counts it.

Each skipped step is counted by reason, printed with the step and the batch keys of the ranks
whose loss was non-finite, and recorded in the run's log; ``max_nonfinite_steps`` skipped steps in
a row stop the run with a :class:`UserError` naming the step and the keys. The data of a skipped
step is consumed (a resumed run replays the same stream).

**Bad data** (:func:`check_skip_fraction`). Readers skip unusable samples and count them by
reason in a :class:`~unified_mm.data.shards.SkipLog`; once at least :data:`MIN_SAMPLES_READ`
samples were read (all ranks together), more than ``max_skip_fraction`` of them skipped stops the
run with a :class:`UserError` naming the counts by reason.

**Test hooks** (environment variables, read by the trainers; never set them in real runs):

``QLIP_FAULT_NAN_STEPS=3,5``   multiply the loss of the first micro-batch of these (1-based) steps by
                               NaN; ``QLIP_FAULT_NAN_RANKS=1`` limits it to the listed ranks.
``QLIP_FAULT_KILL_IN_SAVE=4``  SIGKILL every rank while the checkpoint of step 4 is being written:
                               after DeepSpeed and the RNG files are in the temporary
                               ``.partial-step_*`` directory, before it is renamed and ``latest``
                               updated (:func:`train.ds_engine.save_checkpoint`).
``QLIP_FAULT_STEP_DELAY_S=0.3`` sleep this long after every training step (lets a test kill a
                               run at a chosen step on a fast machine).
"""
from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Sequence

import torch
import torch.distributed as tdist

from mmcore.errors import UserError

MIN_SAMPLES_READ = 100  # the skip fraction is not judged on fewer samples (noise at the start)
MAX_KEYS_SHOWN = 16  # batch keys named per skipped step

ENV_NAN_STEPS = "QLIP_FAULT_NAN_STEPS"
ENV_NAN_RANKS = "QLIP_FAULT_NAN_RANKS"
ENV_KILL_IN_SAVE = "QLIP_FAULT_KILL_IN_SAVE"
ENV_STEP_DELAY = "QLIP_FAULT_STEP_DELAY_S"


# ---------------------------------------------------------------------------------------------
# Collectives (no-ops without a process group)
# ---------------------------------------------------------------------------------------------

def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def _rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def _device() -> torch.device:
    if _distributed() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True when ``flag`` holds on at least one rank (every rank gets the same answer)."""
    if not _distributed():
        return bool(flag)
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_device())
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (a one-element list without a process group)."""
    if not _distributed():
        return [obj]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    if not _distributed():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    tdist.all_reduce(tensor)
    return tensor.cpu().tolist()


# ---------------------------------------------------------------------------------------------
# Test hooks
# ---------------------------------------------------------------------------------------------

def _env_ints(name: str) -> set[int]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return set()
    try:
        return {int(part) for part in raw.split(",") if part.strip()}
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r}: expected comma-separated integers") from None


def inject_nan(loss: torch.Tensor, step: int) -> torch.Tensor:
    """TEST HOOK (``QLIP_FAULT_NAN_STEPS``): ``loss * NaN`` at the listed steps, else ``loss``."""
    steps = _env_ints(ENV_NAN_STEPS)
    if step not in steps:
        return loss
    ranks = _env_ints(ENV_NAN_RANKS)
    if ranks and _rank() not in ranks:
        return loss
    return loss * float("nan")


def kill_in_save(step: int) -> None:
    """TEST HOOK (``QLIP_FAULT_KILL_IN_SAVE``): SIGKILL this process while saving ``step``."""
    if step in _env_ints(ENV_KILL_IN_SAVE):
        os.kill(os.getpid(), signal.SIGKILL)


def step_delay() -> None:
    """TEST HOOK (``QLIP_FAULT_STEP_DELAY_S``): sleep after a training step."""
    raw = os.environ.get(ENV_STEP_DELAY, "").strip()
    if raw:
        time.sleep(float(raw))


# ---------------------------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------------------------

def _is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value.detach()).all())


class StepGuard:
    """Skips optimizer steps whose loss (or gradient) is not finite; stops after too many in a row.

    Use per optimizer step::

        guard.begin(step)                      # 1-based number of the step being computed
        for batch in micro_batches:
            loss = ...forward...
            if guard.backward_and_step(engine, loss, keys):
                ...count this micro-batch's loss terms...
        reason = guard.end(engine)             # None, or why the step was skipped (may raise)

    ``backward_and_step`` and ``end`` are collectives: every rank calls them equally often.
    """

    def __init__(self, max_consecutive: int, log=None):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.log = log or (lambda message: None)
        self.counts: dict[str, int] = {}
        self.consecutive = 0
        self.events: list[dict] = []  # the most recent skipped steps (step, reason, keys)
        self.last_event: dict | None = None
        self._step = 0

    # -- one step -------------------------------------------------------------------------------
    def begin(self, step: int) -> None:
        self._step, self._micro, self._accumulated = step, 0, False
        self._skipping, self._reason, self._keys, self._bad_ranks = False, None, [], []
        self._step_keys: list[str] = []

    def backward_and_step(self, engine, loss: torch.Tensor, keys: Sequence[str] = ()) -> bool:
        """Backward + ``engine.step()`` for one micro-batch unless the step is being skipped.

        Returns True when this micro-batch's loss went into an applied-or-pending update, False
        when it is excluded (its loss, or an earlier micro-batch's, was non-finite on some rank).
        """
        loss = inject_nan(loss, self._step) if self._micro == 0 else loss
        self._micro += 1
        self._step_keys.extend(str(k) for k in keys)
        if not self._skipping:
            bad_here = not _is_finite(loss)
            if any_rank(bad_here):
                self._skipping, self._reason = True, "non-finite loss"
                per_rank = gather_objects(list(map(str, keys)) if bad_here else None)
                self._keys = [key for rank_keys in per_rank if rank_keys for key in rank_keys]
                self._bad_ranks = [rank for rank, rank_keys in enumerate(per_rank) if rank_keys is not None]
        if self._skipping:
            if not self._accumulated:
                return False  # nothing accumulated yet: leave engine and optimizer untouched
            # part of this step is already accumulated: NaN gradients make DeepSpeed's overflow
            # check discard the whole accumulation at the boundary (verified in end())
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        self._accumulated = True
        return not self._skipping

    def end(self, engine) -> str | None:
        """Close the step: None when it was applied, else the reason it was skipped.

        Raises :class:`UserError` after ``max_consecutive`` skipped steps in a row.
        """
        reason, keys = self._reason, self._keys
        if self._skipping and self._accumulated and engine.was_step_applied():
            raise RuntimeError(f"step {self._step}: non-finite loss, but DeepSpeed applied the accumulated "
                               "step (its overflow check is off); use ZeRO stage >= 1")
        if not self._skipping:
            if engine.was_step_applied():
                self.consecutive = 0
                self.last_event = None
                return None
            # DeepSpeed's ZeRO optimizer refused the step: the gradient norm was not finite
            reason = "non-finite gradients"
            keys = [k for rank_keys in gather_objects(self._step_keys) for k in rank_keys]
        self.consecutive += 1
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = keys[:MAX_KEYS_SHOWN]
        more = f" (+{len(keys) - len(shown)} more)" if len(keys) > len(shown) else ""
        event = {"step": self._step, "reason": reason, "keys": shown}
        if self._bad_ranks:
            event["ranks"] = list(self._bad_ranks)
        self.last_event = event
        self.events = (self.events + [event])[-20:]
        where = f" on rank {', '.join(map(str, self._bad_ranks))}" if self._bad_ranks else ""
        self.log(f"step {self._step}: {reason}{where}, step skipped on all ranks "
                 f"({self.consecutive} in a row, {self.total} in total); batch keys: "
                 f"{', '.join(shown) or '?'}{more}")
        if self.consecutive >= self.max_consecutive:
            raise UserError(f"{self.consecutive} non-finite steps in a row (max_nonfinite_steps="
                            f"{self.max_consecutive}), the last at step {self._step} ({reason}) with batch "
                            f"keys {', '.join(shown) or '?'}{more}; lower the learning rate or check the data, "
                            "then resume from the last checkpoint")
        return reason

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        return {"skipped_steps": self.total, "by_reason": dict(sorted(self.counts.items())),
                "recent": list(self.events)}


# ---------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------

def check_skip_fraction(skip_log, max_fraction: float, *, min_read: int = MIN_SAMPLES_READ,
                        what: str = "training data") -> float:
    """Stop the run when too many samples were skipped (all ranks together). A collective.

    ``skip_log`` is this rank's :class:`~unified_mm.data.shards.SkipLog`; its ``read`` counts the
    samples the readers looked at. Returns the global skipped fraction (0 before ``min_read``).
    """
    skipped, read = sum_over_ranks([skip_log.total, skip_log.read])
    if read < min_read or max_fraction >= 1:
        return 0.0
    fraction = skipped / max(read, 1)
    if fraction <= max_fraction:
        return fraction
    counts, _ = merged_skip_summary(skip_log)
    detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items(), key=lambda kv: -kv[1]))
    raise UserError(f"{what}: {int(skipped)} of {int(read)} samples read were skipped "
                    f"({fraction:.1%} > max_skip_fraction={max_fraction:g}); by reason: {detail}. "
                    "Fix or remove the bad shards (the warnings above name them), or raise max_skip_fraction")


def merged_skip_summary(skip_log) -> tuple[dict[str, int], int]:
    """(skipped samples by reason, samples read), summed over all ranks. A collective."""
    counts: dict[str, int] = {}
    read = 0
    for rank_counts, rank_read in gather_objects((skip_log.summary(), skip_log.read)):
        read += rank_read
        for reason, count in rank_counts.items():
            counts[reason] = counts.get(reason, 0) + count
    return dict(sorted(counts.items())), read


def validate_fault_config(max_skip_fraction: float, max_nonfinite_steps: int, keep_last: int) -> None:
    """Config checks shared by the trainers (raise ConfigError naming the field)."""
    from mmcore.config import ConfigError

    if not (isinstance(max_skip_fraction, (int, float)) and math.isfinite(max_skip_fraction)
            and 0 <= max_skip_fraction <= 1):
        raise ConfigError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction!r}")
    if max_nonfinite_steps < 1:
        raise ConfigError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
    if keep_last < 0:
        raise ConfigError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
