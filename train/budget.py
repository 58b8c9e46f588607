"""Wall-clock training budgets: "train for about N seconds" as a step count the schedules end on.

With ``time_budget_s > 0`` a trainer's ``steps`` becomes a cap. The run measures its own step time
and plans how many steps fit in the budget; the warm-up + cosine learning-rate schedule (and the
unified model's mixture schedule) are stretched or shrunk to end exactly at the planned step, so a
budgeted run is a complete, annealed run, not a run cut short.

Why re-plan during the run rather than calibrate once: this machine's speed drifts by ~1.5x from
one phase to the next (the same 900-step tokenizer run took 280 s in one demo and 404 s in
another), so a fixed step count either wastes a fast phase or overruns a slow one, and a single
early estimate inherits whatever phase the first seconds fell in.

The rules (:class:`StepBudget`):

- the first ``settle_steps`` steps of a process are not timed (allocator warm-up, first
  collectives, JIT);
- the rate is the mean step time since then, wall time including the loop's own evaluations
  and checkpoints, since those recur;
- the plan is revised at every call until ``freeze_fraction`` of it is done, then fixed, so
  the last part of the cosine keeps its shape;
- the plan never goes below the current step + 1, ``min_steps``, or above the cap.

A budgeted run is not bit-reproducible (its length depends on the machine's speed); the step
count it chose is logged and saved with every checkpoint, and a resumed run keeps the seconds
already spent and the plan as saved.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from mmcore.config import ConfigError

# The LambdaLR's lr_lambdas hold WarmupCosine objects: stretching the schedule means changing
# their total_steps (LambdaLR.state_dict saves each object's __dict__, so a checkpoint keeps it).


class StepBudget:
    """Plans the total number of steps that fit in ``seconds`` of training-loop wall time."""

    def __init__(self, seconds: float, max_steps: int, *, min_steps: int = 1, settle_steps: int = 5,
                 freeze_fraction: float = 0.9, state: dict | None = None, start_step: int = 0):
        if seconds <= 0:
            raise ConfigError(f"time_budget_s must be > 0 for a budgeted run, got {seconds}")
        if not 0 < freeze_fraction <= 1:
            raise ConfigError(f"freeze_fraction must be in (0, 1], got {freeze_fraction}")
        self.seconds, self.max_steps = float(seconds), int(max_steps)
        self.min_steps = max(1, min(int(min_steps), self.max_steps))
        self.settle_steps, self.freeze_fraction = settle_steps, freeze_fraction
        state = state or {}
        self.planned = int(state.get("planned", self.max_steps))
        self.spent_before = float(state.get("spent_s", 0.0))  # seconds spent before a resume
        self.frozen = bool(state.get("frozen", False))
        self.start_step = start_step
        self._mark: tuple[int, float] | None = None  # (step, elapsed) where timing starts

    def spent(self, elapsed_s: float) -> float:
        return self.spent_before + elapsed_s

    def update(self, step: int, elapsed_s: float) -> int:
        """Steps done so far (across resumes) and seconds since this process's loop began ->
        the planned total (unchanged until a rate can be measured, and after freezing)."""
        if self.frozen or step >= self.planned:  # at the planned end: never extend a finished run
            return self.planned
        if self._mark is None:
            if step - self.start_step >= self.settle_steps:
                self._mark = (step, elapsed_s)
            return self.planned
        mark_step, mark_elapsed = self._mark
        if step <= mark_step:
            return self.planned
        seconds_per_step = max((elapsed_s - mark_elapsed) / (step - mark_step), 1e-9)
        remaining_s = max(0.0, self.seconds - self.spent(elapsed_s))
        fit = step + math.floor(remaining_s / seconds_per_step + 1e-6)  # 1e-6: float noise in the division
        self.planned = min(self.max_steps, max(step + 1, self.min_steps, fit))
        if step >= self.freeze_fraction * self.planned:
            self.frozen = True
        return self.planned

    def adopt(self, planned: int, step: int) -> None:
        """Take the plan every rank agreed on (rank 0's), freezing by the same rule."""
        self.planned = planned
        self.frozen = self.frozen or step >= self.freeze_fraction * planned

    def state(self, elapsed_s: float) -> dict:
        """What a checkpoint keeps: the plan and the seconds spent so far."""
        return {"planned": self.planned, "spent_s": round(self.spent(elapsed_s), 3), "frozen": self.frozen,
                "budget_s": self.seconds}


def agreed_plan(planned: int) -> int:
    """Rank 0's plan on every rank (each rank's clock differs a little; all must stop together)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return planned
    tensor = torch.tensor([planned], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def set_schedule_total(scheduler, total_steps: int) -> None:
    """Make a LambdaLR of :class:`train.optim.WarmupCosine` multipliers end at ``total_steps``
    (never before the warm-up has finished). Takes effect from the scheduler's next step."""
    for multiplier in scheduler.lr_lambdas:
        if not hasattr(multiplier, "total_steps"):
            raise TypeError(f"the scheduler's multiplier {multiplier!r} has no total_steps to plan")
        multiplier.total_steps = max(int(total_steps), multiplier.warmup_steps)


class RunLength:
    """A run's total step count: ``steps`` as configured, or planned within ``budget_s`` seconds.

    Keeps the learning-rate schedule, and whatever else is registered with ``on_change`` (the
    mixture schedule, the progress bar), ending at the same step. Call :meth:`update` at the same
    steps on every rank (it is collective when budgeted), e.g. at logging steps.
    """

    def __init__(self, steps: int, budget_s: float, scheduler, *, min_steps: int = 1,
                 state: dict | None = None, start_step: int = 0):
        self.scheduler = scheduler
        self.budget = None
        self.total = steps
        self.listeners: list = []
        self._loop_start = time.perf_counter()
        if budget_s > 0:
            self.budget = StepBudget(budget_s, steps, min_steps=min_steps, state=state, start_step=start_step)
            self._apply(self.budget.planned)

    def on_change(self, listener) -> None:
        """``listener(total)``: called now and whenever the plan changes."""
        self.listeners.append(listener)
        listener(self.total)

    def track(self, bar) -> None:
        """Keep a tqdm progress bar's total on the plan."""
        def retarget(total: int) -> None:
            bar.total = total
            bar.refresh()
        self.on_change(retarget)

    def end(self, stop_at: int = 0) -> int:
        """The step this process stops at: the plan, or ``stop_at`` (> 0) when that comes first."""
        return min(stop_at, self.total) if stop_at else self.total

    def start_clock(self) -> None:
        """The training loop starts now (setup and the first evaluation are not counted)."""
        self._loop_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._loop_start

    def update(self, step: int) -> int:
        if self.budget is not None:
            planned = agreed_plan(self.budget.update(step, self.elapsed()))
            self.budget.adopt(planned, step)
            if planned != self.total:
                self._apply(planned)
        return self.total

    def _apply(self, total: int) -> None:
        self.total = total
        if self.scheduler is not None:
            set_schedule_total(self.scheduler, total)
        for listener in self.listeners:
            listener(total)

    def state(self) -> dict | None:
        """For the checkpoint and the run's summary (None when not budgeted)."""
        return None if self.budget is None else self.budget.state(self.elapsed())
