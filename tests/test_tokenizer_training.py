"""Tokenizer training end to end on a tiny model (one DeepSpeed process per run, as a subprocess):
resume == continuous, stage 2 leaves the encoder bit-identical, auto balancing, export loading."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tokenizer.export import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY_MODEL = [
    "model.encoder.width=32", "model.encoder.depth=1", "model.encoder.heads=2",
    "model.decoder.width=32", "model.decoder.depth=1", "model.decoder.heads=2",
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "model.embed_dim=32",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny ShapesWorld dataset and text tokenizer, made with the project's own CLIs."""
    root = tmp_path_factory.mktemp("tokdata")
    subprocess.run([sys.executable, "-m", "unified_mm.data.shapesworld_cli", "--config",
                    "configs/data/shapesworld_tiny.yaml", "--out", str(root / "data"), "--quiet"],
                   cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "train.text_tokenizer", f"data={root / 'data'}",
                    f"out={root / 'text.model'}", "vocab_size=300"], cwd=ROOT, check=True, capture_output=True)
    return root


def train(dataset, out_dir, *extra, config="configs/tokenizer/tiny_stage1.yaml", extra_env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(out_dir.parent), **(extra_env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    command = [sys.executable, "train/tokenizer.py", "--config", config, f"out_dir={out_dir}",
               f"data.data={dataset / 'data'}", f"data.text_tokenizer={dataset / 'text.model'}",
               "engine.micro_batch_size=8", "log_every=1", "eval_images=20", "optim.warmup_steps=1",
               "time_budget_s=0", *TINY_MODEL, *extra]  # fixed step counts unless a test budgets
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def losses(out_dir):
    lines = (Path(out_dir) / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: (r["total"], r["recon"], r.get("align")) for r in map(json.loads, lines)}


def test_resume_continues_the_same_loss_sequence(dataset, tmp_path):
    train(dataset, tmp_path / "continuous", "steps=6", "save_every=3")
    train(dataset, tmp_path / "interrupted", "steps=6", "save_every=2", "stop_at=5")
    assert not (tmp_path / "interrupted" / "export").exists()  # stopped before the end
    # as if killed after step 5: the newest checkpoint is step 4, step 5 must be redone
    (tmp_path / "interrupted" / "checkpoints" / "latest").write_text("step_00000004")
    train(dataset, tmp_path / "interrupted", "steps=6", "save_every=2")
    continuous, resumed = losses(tmp_path / "continuous"), losses(tmp_path / "interrupted")
    steps = [json.loads(l)["step"] for l in (tmp_path / "interrupted" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the redone step 5 is logged once
    for step in range(1, 7):
        assert resumed[step] == continuous[step], f"step {step}: {resumed[step]} != {continuous[step]}"


def test_time_budget_plans_the_steps_and_anneals_at_the_end(dataset, tmp_path):
    out = tmp_path / "budget"
    # every step sleeps 0.25 s (test hook): a 4 s budget fits about 15 of the cap's 500 steps
    train(dataset, out, "steps=500", "time_budget_s=4", extra_env={"QLIP_FAULT_STEP_DELAY_S": "0.25"})
    metrics = json.loads((out / "metrics.json").read_text())
    assert 2 <= metrics["steps"] < 100 and metrics["steps_cap"] == 500
    assert metrics["time_budget"]["planned"] == metrics["steps"]
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == metrics["steps"] == records[-1]["planned_steps"]
    # the cosine ends on the planned step (at lr x min_lr_ratio of the saved config), not on the cap's
    optim = yaml.safe_load((out / "config.yaml").read_text())["optim"]
    assert records[-1]["lr"] == pytest.approx(float(optim["lr"]) * float(optim["min_lr_ratio"]))
    assert json.loads((out / "export" / "config.json").read_text())["metadata"]["steps"] == metrics["steps"]


def test_hard_negatives_train_through_the_engine(dataset, tmp_path):
    out = tmp_path / "negatives"
    train(dataset, out, "steps=3", "data.hard_negatives=2")
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["align"]) and 0 <= r["i2t_acc"] <= 1 for r in records)
    # each image competes with its 2 negatives too: the first alignment loss is higher than with none
    plain = tmp_path / "plain"
    train(dataset, plain, "steps=1", "data.hard_negatives=0")
    first_plain = json.loads((plain / "train_log.jsonl").read_text().splitlines()[0])
    assert records[0]["align"] > first_plain["align"]


def test_stage2_freezes_encoder_and_keeps_text_tower(dataset, tmp_path):
    """Also: the perceptual and GAN terms join at their start steps (0-based: logged step 3)."""
    stage1 = tmp_path / "stage1"
    train(dataset, stage1, "steps=3")
    train(dataset, tmp_path / "stage2", "steps=3", f"init_from={stage1 / 'export'}", "perceptual.weight=0.1",
          "perceptual.start_step=2", "gan.gan_weight=0.1", "gan.start_step=2",
          "gan.disc_width=8", "gan.disc_layers=1", config="configs/tokenizer/tiny_stage2.yaml")
    records = [json.loads(line) for line in (tmp_path / "stage2" / "train_log.jsonl").read_text().splitlines()]
    assert [sorted({"perceptual", "gan_g", "gan_d"} & set(r)) for r in records] == [
        [], [], ["gan_d", "gan_g", "perceptual"]]
    before = load_file(stage1 / "export" / "model.safetensors")
    after = load_file(tmp_path / "stage2" / "export" / "model.safetensors")
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith(("encoder.", "image_head.", "text.", "logit_scale"))]
    tuned = [k for k in before if k.startswith(("decoder.", "bottleneck."))]
    assert frozen and tuned
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in tuned)
    log = losses(tmp_path / "stage2")
    assert len(log) == 3
    metrics = json.loads((tmp_path / "stage2" / "metrics.json").read_text())["metrics"]
    assert "zero_shot_acc" in metrics and "psnr_db" in metrics  # the re-attached text tower works
    loaded = load_tokenizer(tmp_path / "stage2" / "export")
    assert loaded.model.text is not None and loaded.metadata["stage"] == 2

    # freeze_codes: the bottleneck's down MLP (and so every image's codes) stays stage 1's
    train(dataset, tmp_path / "codes_kept", "steps=2", f"init_from={stage1 / 'export'}", "freeze_codes=true",
          config="configs/tokenizer/tiny_stage2.yaml")
    kept = load_file(tmp_path / "codes_kept" / "export" / "model.safetensors")
    down = [k for k in before if k.startswith("bottleneck.down.")]
    up = [k for k in before if k.startswith("bottleneck.up.")]
    assert down and up and all(torch.equal(before[k], kept[k]) for k in down)
    assert any(not torch.equal(before[k], kept[k]) for k in up)


def test_auto_balance_uses_pilot_losses(dataset, tmp_path):
    out = tmp_path / "auto"
    train(dataset, out, "steps=2", "balance.mode=auto", "balance.pilot_steps=3", "balance.pilot_tail=1")
    balance = json.loads((out / "balance.json").read_text())
    pilot_recon = [json.loads(l) for l in (out / "pilot_recon" / "train_log.jsonl").read_text().splitlines()]
    pilot_align = [json.loads(l) for l in (out / "pilot_align" / "train_log.jsonl").read_text().splitlines()]
    assert balance["pilot_final_mse"] == pytest.approx(pilot_recon[-1]["recon"])
    assert balance["pilot_final_align"] == pytest.approx(pilot_align[-1]["align"])
    assert balance["recon"] == pytest.approx(balance["align"] * balance["pilot_final_align"] / balance["pilot_final_mse"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_weights"]["recon"] == pytest.approx(balance["recon"])


def test_stage2_resume_restores_discriminator(dataset, tmp_path):
    """Stage 2 trains a discriminator outside DeepSpeed: its weights and optimizer state must come
    back on resume, or the losses after the restart would differ."""
    stage1 = tmp_path / "stage1"
    train(dataset, stage1, "steps=2")
    stage2 = ["steps=4", "save_every=2", f"init_from={stage1 / 'export'}", "gan.disc_width=8", "gan.disc_layers=1",
              "gan.start_step=0", "perceptual.start_step=0"]
    config = "configs/tokenizer/tiny_stage2.yaml"
    train(dataset, tmp_path / "continuous", *stage2, config=config)
    train(dataset, tmp_path / "resumed", *stage2, "stop_at=2", config=config)
    train(dataset, tmp_path / "resumed", *stage2, config=config)
    read = lambda d: [json.loads(l) for l in (d / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    continuous, resumed = read(tmp_path / "continuous"), read(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(continuous, resumed):
        assert (a["total"], a["gan_d"], a["gan_g"]) == (b["total"], b["gan_d"], b["gan_g"]), a["step"]
