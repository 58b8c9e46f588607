"""`make demo`'s deadline: the unified step's training budget shrinks when earlier steps ran slow."""
import pytest

from tests.script_env import ROOT, load_script


@pytest.fixture(scope="module")
def demo():
    return load_script("scripts/demo.py", "demo_script")


def test_budget_is_the_config_unless_the_deadline_needs_less(demo):
    assert demo.unified_budget(355, 0, 800, 135) == 355  # no deadline: always the config's
    assert demo.unified_budget(355, 900, 400, 135) == 355  # on time: never more than the config's
    assert demo.unified_budget(355, 900, 450, 135) == 315  # demo 10's slow phase: 450 s spent
    assert demo.unified_budget(355, 900, 800, 135) == demo.MIN_UNIFIED_BUDGET_S  # never below the floor


def test_only_the_unified_step_is_budgeted_and_its_config_has_a_budget(demo):
    budgeted = [step.name for step in demo.STEPS if step.deadline_reserve > 0]
    assert budgeted == ["unified"]
    unified = next(step for step in demo.STEPS if step.name == "unified")
    assert unified.budget_config == demo.UNIFIED_CONFIG
    assert demo.config_time_budget(ROOT / unified.budget_config) > demo.MIN_UNIFIED_BUDGET_S


def test_report_has_the_targets_after_the_step_table(demo, tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(
        '{"tasks": {"reconstruction": {"scores": {"psnr_db": 27.5, "judge_accuracy": 0.5}}}}')
    (tmp_path / "eval" / "report.md").write_text("# Evaluation\n\n![grid](figures/t2i.png)\n")
    summary = {"seconds": 880.0, "machine": {"cpu": "Some CPU @ 2.00GHz", "cpus": 2, "amx_bf16": False},
               "steps": [{"step": "data", "seconds": 9.0, "result": "ok"},
                         {"step": "eval", "seconds": 60.0, "result": "ok"}]}
    targets = demo.summary_targets(tmp_path, summary)
    text = demo.write_report(tmp_path, summary, targets).read_text()
    table, targets_at, evaluation = text.index("| data |"), text.index("## Targets"), text.index("# Evaluation")
    assert table < targets_at < evaluation
    assert "Total wall time: 880 s on this machine (Some CPU @ 2.00GHz, 2 CPUs, no AMX-BF16)." in text
    assert "| reconstruction PSNR | >= 26 dB | 27.5 dB | met | judge on reconstructions 50.0% |" in text
    assert "| demo wall time | <= 900 s | 880 s | met | slowest step: eval 60 s |" in text
    assert "](eval/figures/t2i.png)" in text  # the evaluation's links now point into eval/
    assert demo.summary_targets(tmp_path / "nothing", summary) == []  # no eval yet: no targets


def test_tokenizer_stages_keep_the_global_batch_on_their_process_count(demo, tmp_path):
    """One process on both cores (scripts/demo.py TOKENIZER_PROCS): its micro-batch is the whole
    global batch the configs give as 2 ranks x 16; the unified model keeps 2 processes."""
    steps = {step.name: step.command(tmp_path) for step in demo.STEPS}
    for name in ("tokenizer_stage1", "tokenizer_stage2"):
        command = steps[name]
        procs = int(command[command.index("--nproc_per_node") + 1])
        micro = [a for a in command if a.startswith("engine.micro_batch_size=")]
        assert procs == demo.TOKENIZER_PROCS and micro == [f"engine.micro_batch_size={32 // procs}"]
    unified = steps["unified"]
    assert unified[unified.index("--nproc_per_node") + 1] == "2"
