"""Fault injection: crashes, bad data and non-finite losses must not cost a run its work.

* kill -9 (the whole process group) of a 2-process DeepSpeed-launcher run of the tokenizer trainer
  and of the unified trainer at a random step, then resume: the logged losses of every step equal
  an uninterrupted run's exactly;
* a kill while a checkpoint is being written (test hook ``QLIP_FAULT_KILL_IN_SAVE``): the previous
  checkpoint is still the one ``latest`` names, loads, and the run resumes from it;
* non-finite losses on one rank skip the step on all ranks and stop the run after
  ``max_nonfinite_steps`` in a row; a DeepSpeed engine in a subprocess shows a skipped step leaves
  weights, optimizer and LR schedule untouched (also with gradient accumulation);
* a dataset with too many bad samples stops with the counts by reason; a few bad samples are
  skipped, counted and reported in metrics.json.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.test_tokenizer_training import TINY_MODEL
from tests.test_unified_training import TINY as UNIFIED_TINY
from tests.unified_env import make_unified_env
from train.distributed import find_free_port, torchrun_command

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
RUN_TIMEOUT = 400


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def run_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLIP_FAULT_")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    tmp.mkdir(parents=True, exist_ok=True)
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp), **extra)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def ds_launch(script: str, *args: str) -> list[str]:
    """2 CPU processes under the DeepSpeed launcher (the runs that get killed and resumed)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
            "--master_port", str(find_free_port()), script, *args]


def tokenizer_args(data: dict, out_dir: Path, *extra: str) -> list[str]:
    return ["--config", "configs/tokenizer/tiny_stage1.yaml", f"out_dir={out_dir}", f"data.data={data['tok_data']}",
            f"data.text_tokenizer={data['text_model']}", "engine.micro_batch_size=8", "log_every=1",
            "eval_images=8", "optim.warmup_steps=1", "data.shuffle_buffer=16", "time_budget_s=0",
            *TINY_MODEL, *extra]


def unified_args(data: dict, out_dir: Path, *extra: str) -> list[str]:
    return ["--config", "configs/unified/tiny.yaml", f"out_dir={out_dir}", f"data.tokenizer={data['tokenizer']}",
            f"data.sources=[{{codes: {data['codes']}, split: train}}]",
            f"data.val={{codes: {data['codes']}, split: val}}", "time_budget_s=0", *UNIFIED_TINY, *extra]


def run(command: list[str], env: dict, log: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    start = time.monotonic()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                timeout=RUN_TIMEOUT, start_new_session=True)
    print(f"{log.name}: exit {result.returncode} after {time.monotonic() - start:.1f} s")
    if expect_ok:
        assert result.returncode == 0, log.read_text()[-5000:]
    return result


def logged_step(out_dir: Path) -> int:
    path = out_dir / "train_log.jsonl"
    steps = [0]
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                pass  # a line being written
    return max(steps)


def latest_step(out_dir: Path) -> int:
    try:
        tag = (out_dir / "checkpoints" / "latest").read_text().strip()
        return int(tag.split("_")[1])
    except (OSError, IndexError, ValueError):
        return 0


def run_and_kill(command: list[str], env: dict, log: Path, out_dir: Path, kill_after_step: int) -> int:
    """Start a run in its own process group; SIGKILL the whole group once a checkpoint at step
    >= 2 exists and the log reached ``kill_after_step``. Returns the last logged step."""
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
    start = time.monotonic()
    deadline = start + RUN_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if latest_step(out_dir) >= 2 and logged_step(out_dir) >= kill_after_step:
                break
            assert proc.poll() is None, f"run ended before the kill:\n{log.read_text()[-4000:]}"
            time.sleep(0.02)
        else:
            pytest.fail(f"no checkpoint >= 2 / step {kill_after_step} in time:\n{log.read_text()[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    print(f"{log.name}: killed at step {logged_step(out_dir)} after {time.monotonic() - start:.1f} s")
    return logged_step(out_dir)


def records(out_dir: Path) -> dict[int, dict]:
    """Step -> all fields logged for it (train record, eval record, skip record merged)."""
    merged: dict[int, dict] = {}
    for record in map(json.loads, (out_dir / "train_log.jsonl").read_text().splitlines()):
        merged.setdefault(record["step"], {}).update(record)
    return merged


def assert_same_losses(reference: Path, resumed: Path, steps: int, keys) -> None:
    ref, res = records(reference), records(resumed)
    assert sorted(k for k in res if k > 0) == list(range(1, steps + 1)), sorted(res)
    for step in range(1, steps + 1):
        a = {k: v for k, v in ref[step].items() if keys(k)}
        b = {k: v for k, v in res[step].items() if keys(k)}
        assert a and a == b, f"step {step}: {b} != uninterrupted {a}"


def checkpoint_dirs(out_dir: Path) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir() if p.is_dir())


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def png(size: int, mode: str = "RGB") -> bytes:
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new(mode, (size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_samples(prefix: str, image_size: int) -> list[dict]:
    """One sample per kind of damage (each is skipped with its own reason)."""
    caption = json.dumps({"captions": ["a red circle"]}).encode()
    return [
        {"__key__": f"{prefix}-notimage", "png": b"\x89PNG not really", "json": caption},
        {"__key__": f"{prefix}-badjson", "png": png(image_size), "json": b"{\"captions\": [\"a"},
        {"__key__": f"{prefix}-wrongsize", "png": png(image_size // 2), "json": caption},
        {"__key__": f"{prefix}-nojson", "png": png(image_size)},
        {"__key__": f"{prefix}-nocaption", "png": png(image_size), "json": json.dumps({"captions": []}).encode()},
        {"__key__": f"{prefix}-list", "png": png(image_size), "json": b"[1, 2]"},
    ]


def write_tar(path: Path, samples: list[dict]) -> None:
    import webdataset as wds
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    env = make_unified_env(root)
    from PIL import Image
    with tarfile.open(sorted((env["data"]).glob("train-*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        image_size = Image.open(tar.extractfile(member)).size[0]
    # tokenizer data: the 4 clean train shards + one shard of 6 bad samples
    tok_data = root / "tok_data"
    tok_data.mkdir()
    for shard in sorted(env["data"].glob("*.tar")):
        shutil.copy(shard, tok_data / shard.name)
    write_tar(tok_data / "train-00099.tar", bad_samples("bad", image_size))
    return {**env, "tok_data": tok_data, "image_size": image_size, "root": root}


# ---------------------------------------------------------------------------------------------
# Non-finite steps on a real DeepSpeed engine (one process, in a subprocess)
# ---------------------------------------------------------------------------------------------

def _guard_checks() -> None:
    """Run in a subprocess: prints one JSON line of results."""
    import torch

    from mmcore.errors import UserError
    from train import ds_engine
    from train.distributed import init_distributed
    from train.faults import StepGuard

    init_distributed()
    results = {}

    def engine(accum: int, zero: int = 2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        # ZeRO stage 0 runs Muon (train.optim.MuonAdamW), whose own gradient check skips the step
        muon = {"name": "muon", "muon_params": ("0.weight", "2.weight")} if zero == 0 else {}
        optim = ds_engine.OptimConfig(lr=0.1, warmup_steps=0, total_steps=100, **muon)
        cfg = ds_engine.EngineConfig(deepspeed_config=f"configs/deepspeed/zero{zero}.json", micro_batch_size=2,
                                     grad_accum_steps=accum, precision="fp32")
        return ds_engine.build_engine(model, optim, cfg)

    def params(e):
        return {k: v.clone() for k, v in ds_engine.full_state_dict(e).items()}

    def step(e, guard, n, losses):
        guard.begin(n)
        for index, kind in enumerate(losses):
            x = torch.ones(2, 4) * (index + 1)
            out = e(x).sum()
            weight = e.module[0].weight
            # badgrad: a finite loss (0) whose gradient is NaN (d sqrt|u| at u = 0)
            loss = {"ok": out, "nan": out * float("nan"),
                    "badgrad": out * 0 + (weight - weight.detach()).abs().sqrt().sum()}[kind]
            guard.backward_and_step(e, loss, [f"k{n}-{index}"])
        return guard.end(e)

    for zero, accum, bad in ((2, 1, ["nan"]), (2, 2, ["ok", "nan"]), (2, 1, ["badgrad"]), (3, 1, ["nan"]),
                             (3, 2, ["ok", "nan"]), (0, 1, ["badgrad"]), (0, 2, ["ok", "nan"])):
        e = engine(accum, zero)
        guard = StepGuard(3)
        before, lr0, steps0 = params(e), ds_engine.current_lr(e), e.global_steps
        reason = step(e, guard, 1, bad)
        after = params(e)
        unchanged = ds_engine.max_abs_diff(before, after) == 0.0
        name = f"zero{zero}-accum{accum}-{'-'.join(bad)}"
        results[name] = {
            "reason": reason, "unchanged": unchanged, "lr_same": ds_engine.current_lr(e) == lr0,
            "keys": guard.last_event["keys"] if guard.last_event else None,
            "global_steps_advanced": e.global_steps - steps0}
        reason_ok = step(e, guard, 2, ["ok"] * accum)
        results[name]["then_ok"] = (
            reason_ok is None and ds_engine.max_abs_diff(after, params(e)) > 0 and guard.consecutive == 0)
        e.destroy()
    e = engine(1)
    guard = StepGuard(2)
    step(e, guard, 1, ["nan"])
    try:
        step(e, guard, 2, ["nan"])
        results["stop"] = None
    except UserError as err:
        results["stop"] = str(err)
    print("RESULTS " + json.dumps(results), flush=True)


def test_nonfinite_step_leaves_engine_untouched(tmp_path):
    command = [sys.executable, "-c", "from tests.test_faults import _guard_checks; _guard_checks()"]
    result = subprocess.run(command, cwd=ROOT, env=run_env(tmp_path / "tmp"), capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    line = next((l for l in result.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert result.returncode == 0 and line, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(line[len("RESULTS "):])
    for name, expected_reason in (("zero2-accum1-nan", "non-finite loss"), ("zero2-accum2-ok-nan", "non-finite loss"),
                                  ("zero2-accum1-badgrad", "non-finite gradients"),
                                  ("zero3-accum1-nan", "non-finite loss"), ("zero3-accum2-ok-nan", "non-finite loss"),
                                  ("zero0-accum1-badgrad", "non-finite gradients"),
                                  ("zero0-accum2-ok-nan", "non-finite loss")):
        case = results[name]
        assert case["reason"] == expected_reason, (name, case)
        assert case["unchanged"] and case["lr_same"] and case["then_ok"], (name, case)
    assert results["zero2-accum1-nan"]["keys"] == ["k1-0"]
    assert results["zero2-accum1-nan"]["global_steps_advanced"] == 0
    assert results["zero2-accum2-ok-nan"]["keys"] == ["k1-1"]
    assert "2 non-finite steps in a row" in results["stop"] and "step 2" in results["stop"] \
        and "k2-0" in results["stop"]


# ---------------------------------------------------------------------------------------------
# Kill -9 and resume (2 processes, DeepSpeed launcher)
# ---------------------------------------------------------------------------------------------

def reference_then_kill(script: str, args_for, data, steps: list[str], ref: Path, out: Path, tmp_path: Path,
                        prefix: str) -> int:
    """An uninterrupted reference run of ``script`` (torchrun) into ``ref``, then the same run under
    the DeepSpeed launcher into ``out``, killed with -9 once a random step in 3..5 is logged; returns
    the last step it logged. ``args_for(data, out_dir, *steps)`` builds the script's arguments."""
    # torchrun: same world, backend and numerics as ds_launch, a few seconds cheaper to start
    run(torchrun_command(script, *args_for(data, ref, *steps)), run_env(tmp_path / f"{prefix}0"), tmp_path / "reference.log")
    kill_at = random.randint(3, 5)
    print(f"killing {script} once step {kill_at} is logged")
    return run_and_kill(ds_launch(script, *args_for(data, out, *steps)),
                        run_env(tmp_path / f"{prefix}1", QLIP_FAULT_STEP_DELAY_S="0.4"), tmp_path / "killed.log",
                        out, kill_at)


def test_tokenizer_kill9_resumes_with_identical_losses(data, tmp_path):
    # 6 bad samples in 70: up to ~15% of the samples read so far early in an epoch, so allow 25%
    steps = ["steps=6", "save_every=2", "max_skip_fraction=0.25"]
    ref, killed = tmp_path / "reference", tmp_path / "killed"
    last = reference_then_kill("train/tokenizer.py", tokenizer_args, data, steps, ref, killed, tmp_path, "t")
    assert not (killed / "export").exists()
    resume_from = latest_step(killed)
    assert 2 <= resume_from <= last
    run(ds_launch("train/tokenizer.py", *tokenizer_args(data, killed, *steps)), run_env(tmp_path / "t2"),
        tmp_path / "resumed.log")
    resumed_from = killed / "checkpoints" / f"step_{resume_from:08d}"
    assert f"resumed from {resumed_from}" in (tmp_path / "resumed.log").read_text()
    assert_same_losses(ref, killed, 6, lambda k: k in ("total", "recon", "align", "quantizer", "lr"))
    # the bad shard's samples were skipped, counted by reason, and reported
    metrics = json.loads((killed / "metrics.json").read_text())
    assert {"unreadable image", "bad json", "wrong image size", "missing part", "no caption"} <= set(
        metrics["skipped_samples"]), metrics["skipped_samples"]
    assert metrics["nonfinite_steps"]["skipped_steps"] == 0
    assert metrics["skipped_samples"] == json.loads((ref / "metrics.json").read_text())["skipped_samples"]


def test_unified_kill9_then_kill_in_save_resumes_with_identical_losses(data, tmp_path):
    steps = ["steps=6", "save_every=2", "keep_last=2"]
    ref, out = tmp_path / "reference", tmp_path / "faulty"
    # 1. kill -9 at a random step
    last = reference_then_kill("train/unified.py", unified_args, data, steps, ref, out, tmp_path, "u")
    first_resume = latest_step(out)
    assert 2 <= first_resume <= last
    # 2. resume, and die while writing the next checkpoint (after the shards, before the rename)
    kill_save = min(first_resume + 2, 6)
    result = run(ds_launch("train/unified.py", *unified_args(data, out, *steps)),
                 run_env(tmp_path / "u2", QLIP_FAULT_KILL_IN_SAVE=str(kill_save)), tmp_path / "kill_in_save.log",
                 expect_ok=False)
    assert result.returncode != 0
    checkpoints = out / "checkpoints"
    assert (checkpoints / f".partial-step_{kill_save:08d}").is_dir()  # the interrupted write
    assert latest_step(out) == first_resume  # latest still names the previous checkpoint ...
    from train import ds_engine
    assert ds_engine.latest_tag(checkpoints) == f"step_{first_resume:08d}"
    assert ds_engine.is_complete(checkpoints / f"step_{first_resume:08d}")
    weights = ds_engine.consolidate_fp32(checkpoints)  # ... which loads (weights only)
    assert weights and all(bool(t.isfinite().all()) for t in weights.values())
    # 3. resume from it and finish
    run(ds_launch("train/unified.py", *unified_args(data, out, *steps)), run_env(tmp_path / "u3"),
        tmp_path / "resumed.log")
    log = (tmp_path / "resumed.log").read_text()
    assert f"resumed from {checkpoints / f'step_{first_resume:08d}'}" in log
    assert_same_losses(ref, out, 6, lambda k: k.startswith("loss") or k == "lr")
    ref_metrics = json.loads((ref / "metrics.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_eval"] == ref_metrics["final_eval"]
    assert metrics["vqa_greedy"] == ref_metrics["vqa_greedy"]
    # leftovers cleaned, rotation kept the newest two complete checkpoints
    assert checkpoint_dirs(out) == ["step_00000004", "step_00000006"]
    assert all(ds_engine.is_complete(checkpoints / name) for name in checkpoint_dirs(out))


# ---------------------------------------------------------------------------------------------
# Non-finite losses and bad data in full runs
# ---------------------------------------------------------------------------------------------

def test_nonfinite_loss_on_one_rank_skips_then_stops(data, tmp_path):
    out = tmp_path / "nan"
    env = run_env(tmp_path / "n", QLIP_FAULT_NAN_STEPS="2,4,5", QLIP_FAULT_NAN_RANKS="1")
    result = run(ds_launch("train/unified.py", *unified_args(data, out, "steps=8", "max_nonfinite_steps=2")),
                 env, tmp_path / "nan.log", expect_ok=False)
    text = (tmp_path / "nan.log").read_text()
    assert result.returncode != 0, text[-3000:]
    assert "error: 2 non-finite steps in a row" in text and "the last at step 5 (non-finite loss)" in text, text[-3000:]
    assert "Traceback" not in text
    log = records(out)
    assert log[2]["skipped"] == "non-finite loss" and log[2]["skipped_keys"]  # named, from rank 1
    assert log[4]["skipped"] == "non-finite loss"
    for step in (1, 3):
        assert isinstance(log[step]["loss"], float) and log[step]["loss"] == log[step]["loss"]
    assert 6 not in log  # stopped at step 5


def test_stream_skips_malformed_metas_instead_of_crashing(data, tmp_path):
    """Precomputed samples whose meta cannot make a sequence (a chat that does not alternate, an
    empty answer, malformed turns) are skipped and counted by the training stream, never raised."""
    from mmcore.text_tokenizer import TextTokenizer
    from tokenizer.export import tokenizer_hash
    from unified_mm.data.mixture import MixedTaskStream, MixtureConfig, SourceConfig
    from unified_mm.data.shards import SkipLog
    from unified_mm.sequence import SequenceBuilder
    from unified_mm.tokenizer_cli import read_manifest, read_precomputed
    from unified_mm.vocab import Vocab
    codes_dir = tmp_path / "codes"
    shutil.copytree(data["codes"], codes_dir)
    manifest = read_manifest(codes_dir)
    hash_ = tokenizer_hash(data["tokenizer"])
    good = list(read_precomputed(codes_dir, "train", hash_))[:4]
    turn = lambda role, text: {"role": role, "text": text}  # noqa: E731
    bad_metas = [{"conversations": [turn("user", "hi")]},
                 {"conversations": [turn("assistant", "a"), turn("user", "q")]},
                 {"qa": [{"question": "what?", "answer": ""}]}, {"conversations": [1, {"role": "user"}]},
                 {"conversations": [turn("system", "x"), turn("assistant", "y")]}]
    codes_bytes = io_npy(good[0][1])
    samples = [{"__key__": key, "json": json.dumps(meta).encode(), "codes.npy": io_npy(codes)}
               for key, codes, meta in good]
    samples += [{"__key__": f"bad{i}", "json": json.dumps(meta).encode(), "codes.npy": codes_bytes}
                for i, meta in enumerate(bad_metas)]
    for name in manifest["splits"]["train"]["shards"]:
        (codes_dir / name).unlink()
    write_tar(codes_dir / manifest["splits"]["train"]["shards"][0], samples)
    manifest["splits"]["train"]["shards"] = manifest["splits"]["train"]["shards"][:1]
    (codes_dir / "manifest.json").write_text(json.dumps(manifest))
    text = TextTokenizer(data["text_model"])
    vocab = Vocab.for_tokenizers(text.vocab_size, manifest["num_bits"], manifest["group_size"], manifest["grid_size"])
    skip_log = SkipLog()
    stream = MixedTaskStream([SourceConfig(codes=str(codes_dir))], MixtureConfig(start={"chat": 1, "vqa": 1}),
                             SequenceBuilder(text, vocab, 192), tokenizer_hash=hash_, total_steps=10, seed=0, rank=0,
                             shuffle_buffer=0, skip_log=skip_log)
    sequences = [stream.next_sequence(0) for _ in range(40)]
    assert len(sequences) == 40 and {s.task for s in sequences} == {"chat", "vqa"}
    assert skip_log.counts["unusable sample"] >= 3, skip_log.summary()


def io_npy(array) -> bytes:
    import io

    import numpy as np
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def test_too_many_bad_samples_stop_the_run(data, tmp_path):
    bad = tmp_path / "bad_data"
    bad.mkdir()
    clean = sorted(data["data"].glob("train-*.tar"))[0]
    shutil.copy(clean, bad / "train-00000.tar")
    write_tar(bad / "train-00001.tar", bad_samples("x", data["image_size"]))
    command = [sys.executable, "train/tokenizer.py", *tokenizer_args({**data, "tok_data": bad}, tmp_path / "run",
                                                                     "steps=40")]
    result = run(command, run_env(tmp_path / "b"), tmp_path / "bad.log", expect_ok=False)
    text = (tmp_path / "bad.log").read_text()
    assert result.returncode == 2, text[-3000:]
    match = re.search(r"error: [^\r\n]*", text)  # (tqdm's bar may share the line)
    assert match, text[-3000:]
    error = match.group(0)
    assert "max_skip_fraction=0.1" in error and "samples read were skipped" in error
    for reason in ("unreadable image", "bad json", "wrong image size", "missing part", "no caption"):
        assert reason in error, error
    assert not (tmp_path / "run" / "export").exists()
