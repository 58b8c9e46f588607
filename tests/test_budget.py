"""Wall-clock budgets (train/budget.py): the planned step count fits the budget, respects the cap
and the minimum, freezes near the end, survives a resume, and the LR schedule ends on it."""
import pytest
import torch

from mmcore.config import ConfigError
from train.budget import RunLength, StepBudget, set_schedule_total
from train.optim import OptimConfig, build_optimizer, build_scheduler


def drive(budget: StepBudget, seconds_per_step: float, steps: range, overhead_s: float = 0.0,
          start_elapsed: float = 0.0) -> list[int]:
    """Feed the budget a clock where each step takes ``seconds_per_step`` (after a one-off overhead)."""
    plans = []
    for step in steps:
        done_here = step - steps.start + 1
        plans.append(budget.update(step + 1, start_elapsed + overhead_s + seconds_per_step * done_here))
    return plans


def test_plan_fits_the_budget_after_the_settling_steps():
    budget = StepBudget(10.0, max_steps=1000, settle_steps=5)
    plans = drive(budget, 0.1, range(0, 50), overhead_s=0.3)
    assert plans[:5] == [1000] * 5  # not timed yet: the cap stands
    # 10 s at 0.1 s/step, less the 0.3 s one-off overhead: 97 steps
    assert plans[-1] == 97


def test_plan_respects_cap_and_minimum():
    slow = StepBudget(1.0, max_steps=1000, min_steps=40, settle_steps=1)
    assert drive(slow, 0.5, range(0, 3))[-1] == 40  # 1 s fits 2 steps; the minimum wins
    fast = StepBudget(1000.0, max_steps=50, settle_steps=1)
    assert drive(fast, 0.01, range(0, 10))[-1] == 50
    with pytest.raises(ConfigError, match="time_budget_s"):
        StepBudget(0, max_steps=10)


def test_a_plan_at_the_cap_ends_there():
    # plenty of time: the plan is the cap, and asking again at the last step must not extend it
    budget = StepBudget(1000.0, max_steps=60, min_steps=11, settle_steps=5)
    plans = [budget.update(step, 0.01 * step) for step in range(10, 61, 10)]
    assert plans == [60] * 6 and budget.planned == 60


def test_plan_follows_a_slowdown_then_freezes_near_the_end():
    budget = StepBudget(10.0, max_steps=1000, settle_steps=1)
    drive(budget, 0.1, range(0, 20))
    assert budget.planned == 100
    # the machine halves its speed: the plan shrinks
    plan = drive(budget, 0.2, range(20, 40), start_elapsed=2.0)[-1]
    assert plan < 100 and not budget.frozen
    # past 90% of the plan it no longer moves, whatever the clock says
    step = 40
    while not budget.frozen:
        drive(budget, 0.2, range(step, step + 1), start_elapsed=6.0 + 0.2 * (step - 40))
        step += 1
    assert step >= 0.9 * budget.planned
    frozen_plan = budget.planned
    assert drive(budget, 0.01, range(step, step + 5), start_elapsed=100.0)[-1] == frozen_plan


def test_state_round_trip_keeps_plan_and_spent_seconds():
    budget = StepBudget(10.0, max_steps=1000, settle_steps=1)
    drive(budget, 0.1, range(0, 30))
    state = budget.state(3.0)
    assert state == {"planned": 100, "spent_s": 3.0, "frozen": False, "budget_s": 10.0}
    resumed = StepBudget(10.0, max_steps=1000, settle_steps=1, state=state, start_step=30)
    assert resumed.update(31, 0.1) == 100  # settling again: the saved plan stands
    # 3 s were spent before the resume: 7 s left at 0.1 s/step from step 30
    assert drive(resumed, 0.1, range(31, 40), start_elapsed=0.1)[-1] == 100
    assert resumed.spent(1.0) == pytest.approx(4.0)


def test_schedule_ends_on_the_planned_step_and_the_checkpoint_keeps_it():
    optim_cfg = OptimConfig(lr=1.0, warmup_steps=2, total_steps=1000, min_lr_ratio=0.1)
    scheduler = build_scheduler(build_optimizer(torch.nn.Linear(2, 2), optim_cfg), optim_cfg)
    set_schedule_total(scheduler, 10)
    optimizer = scheduler.optimizer
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1)  # annealed at step 10, not at 1000
    # LambdaLR saves its multiplier objects' attributes: a resume keeps the planned horizon
    fresh = build_scheduler(build_optimizer(torch.nn.Linear(2, 2), optim_cfg), optim_cfg)
    fresh.load_state_dict(scheduler.state_dict())
    assert all(m.total_steps == 10 for m in fresh.lr_lambdas)


def test_run_length_without_budget_is_the_configured_steps():
    length = RunLength(123, 0.0, None)
    seen = []
    length.on_change(seen.append)
    assert length.update(50) == 123 and length.state() is None and seen == [123]
