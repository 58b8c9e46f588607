"""Unified-model training end to end on a tiny model under DeepSpeed (subprocesses):
resume == continuous (same data, same losses), 2-process ZeRO-2 / ZeRO-3 runs train and export,
the export reloads to the trained weights, bad inputs are clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.distributed import find_free_port, torchrun_command
from unified_mm.export import load_unified
from unified_mm.image_positions import image_position_embedding
from tests.unified_env import make_unified_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = ["model.overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
        "num_key_value_heads: 2}", "engine.micro_batch_size=4", "log_every=1", "eval_per_task=4",
        "vqa_questions=8", "optim.warmup_steps=1", "data.shuffle_buffer=16", "data.max_length=160",
        "time_budget_s=0"]  # fixed step counts unless a test budgets


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_unified_env(tmp_path_factory.mktemp("unified"))


def command(env, out_dir, *extra, procs=1, launcher="torchrun"):
    args = ["--config", "configs/unified/tiny.yaml", f"out_dir={out_dir}", f"data.tokenizer={env['tokenizer']}",
            f"data.sources=[{{codes: {env['codes']}, split: train}}]", f"data.val={{codes: {env['codes']}, split: val}}",
            *TINY, *extra]
    if procs == 1:
        return [sys.executable, "train/unified.py", *args]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs),
                "--master_port", str(find_free_port()), "train/unified.py", *args]
    return torchrun_command("train/unified.py", *args, nproc=procs)


def train(env, out_dir, *extra, procs=1, expect_ok=True, launcher="torchrun", extra_env=None):
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(Path(out_dir).parent), **(extra_env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        run_env.pop(var, None)
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), run_env.get("PYTHONPATH")]))
    result = subprocess.run(command(env, out_dir, *extra, procs=procs, launcher=launcher), cwd=ROOT, env=run_env,
                            capture_output=True, text=True, timeout=400)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def losses(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss")} for r in records if "loss" in r}


ADAMW_ZERO2 = ["optim.name=adamw", "engine.deepspeed_config=configs/deepspeed/zero2.json"]
MUON_ZERO0 = ["optim.name=muon", "optim.muon_params=[model.layers.*]",
              "engine.deepspeed_config=configs/deepspeed/zero0.json"]


@pytest.mark.parametrize("optimizer", [ADAMW_ZERO2, MUON_ZERO0], ids=["adamw_zero2", "muon_zero0"])
def test_resume_continues_with_the_same_data_and_losses(env, tmp_path, optimizer):
    """With Muon the momentum buffers must come back too, or the losses after the restart differ."""
    train(env, tmp_path / "continuous", "steps=6", "save_every=3", *optimizer)
    train(env, tmp_path / "interrupted", "steps=6", "save_every=2", "stop_at=5", *optimizer)
    assert not (tmp_path / "interrupted" / "export").exists()
    # as if killed after step 5: the newest checkpoint is step 4, step 5 must be redone
    (tmp_path / "interrupted" / "checkpoints" / "latest").write_text("step_00000004")
    train(env, tmp_path / "interrupted", "steps=6", "save_every=2", *optimizer)
    if optimizer is MUON_ZERO0:  # Muon really stepped the decoder layers' matrices (and AdamW the rest)
        checkpoint = next((tmp_path / "continuous" / "checkpoints").glob("step_*/mp_rank_00_model_states.pt"))
        saved = torch.load(checkpoint, weights_only=True)
        assert [g["use_muon"] for g in saved["optimizer"]["param_groups"]] == [True, False, False]
        assert "momentum_buffer" in saved["optimizer"]["state"][0]
    continuous, resumed = losses(tmp_path / "continuous"), losses(tmp_path / "interrupted")
    # DeepSpeed's copied recovery scripts unpickle unrestricted: they must not be left behind
    assert not list((tmp_path / "interrupted" / "checkpoints").glob("zero_to_*.py"))
    assert sorted(resumed) == list(range(1, 7))  # the redone step is logged once
    for step in range(1, 7):
        assert resumed[step] == continuous[step], f"step {step}: {resumed[step]} != {continuous[step]}"
    metrics = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())
    assert metrics["final_eval"] == json.loads((tmp_path / "continuous" / "metrics.json").read_text())["final_eval"]


def test_time_budget_sets_the_run_length_and_the_schedule_ends_on_it(env, tmp_path):
    out = tmp_path / "budget"
    # every step sleeps 0.25 s (test hook), so a 4 s budget fits about 15 of the cap's 500 steps
    train(env, out, "steps=500", "time_budget_s=4", extra_env={"QLIP_FAULT_STEP_DELAY_S": "0.25"})
    metrics = json.loads((out / "metrics.json").read_text())
    assert 2 <= metrics["steps"] == metrics["planned_steps"] < 100
    assert metrics["steps_cap"] == 500 and metrics["time_budget"]["budget_s"] == 4
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    trained = [r for r in records if "lr" in r]
    assert trained[-1]["step"] == metrics["steps"] and trained[-1]["planned_steps"] == metrics["steps"]
    # the cosine was retargeted: the last step ran at the floor (lr 4e-3 x min_lr_ratio 0.1), where a
    # 500-step schedule would still be near its peak
    assert trained[-1]["lr"] == pytest.approx(4e-4)
    assert load_unified(out / "export").hash == metrics["export_hash"]


def test_budgeted_run_resumes_with_its_plan_and_spent_seconds(env, tmp_path):
    out, delay = tmp_path / "budget_resume", {"QLIP_FAULT_STEP_DELAY_S": "0.25"}
    train(env, out, "steps=500", "time_budget_s=4", "stop_at=8", extra_env=delay)
    assert not (out / "export").exists()  # stopped on purpose at step 8, with a checkpoint
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    first_plan = [r["planned_steps"] for r in records if "planned_steps" in r][-1]
    assert 8 < first_plan < 500  # planned before the stop
    train(env, out, "steps=500", "time_budget_s=4", extra_env=delay)
    metrics = json.loads((out / "metrics.json").read_text())
    budget = metrics["time_budget"]
    # the seconds before the stop count: the resumed run plans the budget's remainder, so the run
    # ends near its first plan, not ~8 steps (the first part) beyond it
    assert budget["spent_s"] >= 8 * 0.25 and budget["frozen"]
    assert metrics["steps"] == budget["planned"] < first_plan + 5
    trained = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    trained = [r for r in trained if "lr" in r]
    assert [r["step"] for r in trained] == list(range(1, metrics["steps"] + 1))
    assert trained[-1]["lr"] == pytest.approx(4e-4)  # annealed on the planned step


@pytest.mark.parametrize("zero, launcher, places, autocast, group_bits", [(2, "torchrun", False, "bf16", 0),
                                                                          (3, "deepspeed", True, "none", 12),
                                                                          (0, "torchrun", True, "none", 0)],
                         ids=["zero2", "zero3", "zero0_muon"])
def test_two_process_zero_run_trains_and_exports(env, tmp_path, zero, launcher, places, autocast, group_bits):
    """ZeRO-3 runs with image position embeddings: their tables are partitioned like every other
    parameter, gathered into the export, and rebuilt from config.json when it is loaded. The
    ZeRO-2 run trains its forward under bf16 autocast, with logits at labelled positions only; its
    evaluation stays fp32 with full logits, so the reloaded export reproduces the logged held-out
    losses all the same. The ZeRO-3 run writes one image id of all 12 bits per patch
    (``model.image_group_size``), regrouped from the stored two 6-bit codes."""
    out = tmp_path / f"zero{zero}"
    # ZeRO 2/3 with AdamW; stage 0 with the demo's Muon, whose two ranks split the Newton-Schulz
    # work (train.optim.Muon; that the split steps exactly like one rank: tests/test_muon_split.py)
    optimizer = MUON_ZERO0 if zero == 0 else ["optim.name=adamw"]
    result = train(env, out, "steps=4", *optimizer, f"engine.deepspeed_config=configs/deepspeed/zero{zero}.json",
                   f"model.image_positions={str(places).lower()}", f"engine.cpu_autocast={autocast}",
                   f"model.image_group_size={group_bits}", procs=2, launcher=launcher)
    assert ("Muon: Newton-Schulz split across 2 ranks" in result.stdout) == (zero == 0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cpu_autocast"] == ("bfloat16" if autocast == "bf16" else None)
    assert set(metrics["final_eval"]) == {f"eval/{t}" for t in ("vqa", "caption", "chat", "t2i", "text",
                                                                 "t2i_uncond", "t2i_text_gain")}
    assert metrics["vqa_greedy"]["questions"] == 8
    loaded = load_unified(out / "export")
    assert loaded.hash == metrics["export_hash"] and loaded.tokenizer_hash == metrics["tokenizer_hash"]
    assert (image_position_embedding(loaded.model) is not None) == places
    assert (loaded.vocab.num_groups, loaded.vocab.code_groups) == ((1, 2) if group_bits == 12 else (2, 2))
    # the export holds the trained weights: its held-out loss is the logged final one
    from mmcore.config import load_config
    from train.unified import UnifiedTrainConfig
    from unified_mm.data.mixture import SourceConfig, eval_sequences
    from unified_mm.quick_eval import heldout_losses
    from unified_mm.sequence import SequenceBuilder
    builder = SequenceBuilder(loaded.text_tokenizer, loaded.vocab, 160)
    # the run's own mixture (its saved config): chat_turns decides how many turns a conversation
    # keeps, and one id per patch leaves room for more of them under max_length
    mixture = load_config(UnifiedTrainConfig, out / "config.yaml").mixture
    held = eval_sequences(SourceConfig(codes=str(env["codes"]), split="val"), mixture, builder,
                          tokenizer_hash=loaded.tokenizer_hash, per_task=4)
    again = heldout_losses(loaded.model, loaded.vocab, held, pad_id=loaded.text_tokenizer.pad_id)
    for task, value in again.items():
        assert value == pytest.approx(metrics["final_eval"][f"eval/{task}"], rel=1e-4)
    gain = (again["t2i_uncond"] - again["t2i"]) * (loaded.vocab.tokens_per_image + 3)  # <boi> ids <eoi> <eos>
    assert gain == pytest.approx(metrics["final_eval"]["eval/t2i_text_gain"], rel=1e-3, abs=1e-5)
    logs = losses(out)
    assert sorted(logs) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs.values())


def test_bad_inputs_are_one_line_errors(env, tmp_path):
    result = train(env, tmp_path / "bad", "data.tokenizer=/nonexistent", expect_ok=False)
    assert result.returncode == 2 and "data.tokenizer=/nonexistent" in result.stderr
    result = train(env, tmp_path / "bad", "mixture.start={ocr: 1}", expect_ok=False)
    assert result.returncode == 2 and "unknown task 'ocr'" in result.stderr
    other = tmp_path / "other_tok"
    import shutil
    shutil.copytree(env["tokenizer"], other)
    (other / "config.json").write_text((other / "config.json").read_text().replace('"metadata": {}', '"metadata": {"x": 1}'))
    result = train(env, tmp_path / "bad", f"data.tokenizer={other}", expect_ok=False)
    assert result.returncode == 2 and "rerun precompute" in result.stderr
    assert "Traceback" not in result.stderr
