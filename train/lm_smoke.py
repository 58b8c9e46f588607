"""Distributed smoke run: a tiny Llama trained under DeepSpeed ZeRO, checkpointed, resumed, merged.

Launch (any of)::

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 train/lm_smoke.py --config configs/smoke/lm_smoke.yaml
    torchrun --nproc_per_node 2 train/lm_smoke.py --config configs/smoke/lm_smoke.yaml engine.deepspeed_config=configs/deepspeed/zero3.json
    python train/lm_smoke.py --config configs/smoke/lm_smoke.yaml          # one process

What it proves, in order:

1. ``steps`` optimizer steps on a synthetic task; the loss (mean over ranks) is logged per step
   to ``<out_dir>/loss.jsonl`` and must go down.
2. A checkpoint is saved; the engine then takes one more step ("continuous").
3. A fresh model (different init) and engine load the checkpoint: parameters must equal the
   saved ones, and the same next step must give the same loss and parameters ("resume").
4. The ZeRO checkpoint is merged to one fp32 state dict, written as safetensors, read back and
   compared with the trained parameters.

``<out_dir>/summary.json`` records losses, step time, ZeRO stage, world size and each check;
the exit code is 1 when any check fails (2 for a bad config).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by a launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmcore.config import ConfigError, add_config_args, config_to_dict, load_config, save_config
from mmcore.errors import cli_entry
from mmcore.io import atomic_write_json
from train import ds_engine
from train.distributed import (DistInfo, add_launcher_args, all_ranks_true, all_reduce_mean,
                               barrier, init_distributed, print_rank0, set_seed,
                               shutdown_distributed)


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 128


@dataclasses.dataclass
class DataConfig:
    """Arithmetic progressions mod vocab: ``x[t+1] = (x[t] + k) % vocab``, k in [1, max_stride].

    A repeated pattern that a 2-layer model picks up within ~20 steps: the current token narrows
    the next one to ``max_stride`` choices and the previous token pins it down.
    """
    seq_len: int = 64
    max_stride: int = 4
    seed: int = 1234


@dataclasses.dataclass
class SmokeConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: ds_engine.OptimConfig = dataclasses.field(default_factory=ds_engine.OptimConfig)
    engine: ds_engine.EngineConfig = dataclasses.field(default_factory=ds_engine.EngineConfig)
    steps: int = 30
    seed: int = 0
    out_dir: str = "runs/lm_smoke"
    atol: float = 1e-6  # resume/consolidation comparisons (runs are deterministic on CPU)

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.optim.total_steps < self.steps + 1:  # +1: the continuation step after the save
            raise ConfigError(f"optim.total_steps ({self.optim.total_steps}) must be > steps ({self.steps})")
        if self.atol < 0:
            raise ConfigError(f"atol must be >= 0, got {self.atol}")
        if self.data.seq_len > self.model.max_positions:
            raise ConfigError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_positions "
                              f"({self.model.max_positions})")


# ---------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------

def build_model(cfg: ModelConfig, seed: int) -> LlamaForCausalLM:
    """Fresh tiny Llama; the seed makes every rank build identical weights."""
    set_seed(seed)
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                         max_position_embeddings=cfg.max_positions, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def make_sample(cfg: DataConfig, vocab_size: int, index: int) -> torch.Tensor:
    """Sample ``index`` of an endless deterministic dataset (same on every rank and every run)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    stride = int(torch.randint(1, cfg.max_stride + 1, (1,), generator=gen))
    start = int(torch.randint(0, vocab_size, (1,), generator=gen))
    return (start + stride * torch.arange(cfg.seq_len)) % vocab_size


def micro_batches(cfg: SmokeConfig, samples_seen: int, dist: DistInfo) -> list[dict]:
    """This rank's micro-batches for the step that starts at global sample ``samples_seen``.

    The step's global batch is split micro-batch-major, rank-minor, so ranks read disjoint
    slices and the data position is one integer that does not depend on the world size layout.
    """
    micro = cfg.engine.micro_batch_size
    batches = []
    for m in range(cfg.engine.grad_accum_steps):
        first = samples_seen + (m * dist.world_size + dist.rank) * micro
        ids = torch.stack([make_sample(cfg.data, cfg.model.vocab_size, first + i) for i in range(micro)])
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def global_batch_size(cfg: SmokeConfig, dist: DistInfo) -> int:
    return cfg.engine.micro_batch_size * cfg.engine.grad_accum_steps * dist.world_size


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------

def train(engine, cfg: SmokeConfig, dist: DistInfo, log_path: Path) -> list[dict]:
    """``cfg.steps`` steps from sample 0; returns the per-step records (rank 0 writes them)."""
    records = []
    log = log_path.open("w", encoding="utf-8") if dist.is_main else None
    try:
        for step in range(1, cfg.steps + 1):
            start = time.perf_counter()
            loss = ds_engine.train_step(engine, micro_batches(cfg, (step - 1) * global_batch_size(cfg, dist), dist))
            record = {"step": step, "loss": all_reduce_mean(loss), "lr": ds_engine.current_lr(engine),
                      "step_time_s": time.perf_counter() - start}
            records.append(record)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            print_rank0(f"step {step:3d}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                        f"{record['step_time_s'] * 1000:.0f} ms")
    finally:
        if log:
            log.close()
    return records


def next_step(engine, cfg: SmokeConfig, dist: DistInfo, samples_seen: int) -> tuple[float, dict]:
    """One more step from ``samples_seen``; returns the mean loss and the updated parameters."""
    loss = all_reduce_mean(ds_engine.train_step(engine, micro_batches(cfg, samples_seen, dist)))
    return loss, ds_engine.full_state_dict(engine)


def check(name: str, passed: bool, **detail) -> dict:
    print_rank0(f"check {name}: {'ok' if passed else 'FAILED'} {detail}")
    return {"name": name, "passed": bool(passed), **detail}


def resume_checks(cfg: SmokeConfig, dist: DistInfo, ckpt_dir: Path, tag: str, saved: dict,
                  cont_loss: float, cont_params: dict) -> list[dict]:
    """Fresh model + engine, load ``tag``, take the same next step as the continuous run."""
    # A different init seed: if loading silently did nothing the comparison would fail.
    engine = ds_engine.build_engine(build_model(cfg.model, cfg.seed + 1), cfg.optim, cfg.engine)
    state = ds_engine.load_checkpoint(engine, ckpt_dir, tag)
    loaded_diff = ds_engine.max_abs_diff(ds_engine.full_state_dict(engine), saved)
    resume_loss, resume_params = next_step(engine, cfg, dist, state["samples_seen"])
    step_diff = ds_engine.max_abs_diff(resume_params, cont_params)
    engine.destroy()
    return [
        check("trainer_state_restored", state.get("step") == cfg.steps, step=state.get("step")),
        check("params_after_load", loaded_diff <= cfg.atol, max_abs_diff=loaded_diff),
        check("resume_loss_matches", abs(resume_loss - cont_loss) <= cfg.atol,
              continuous=cont_loss, resumed=resume_loss),
        check("params_after_resumed_step", step_diff <= cfg.atol, max_abs_diff=step_diff),
    ]


def consolidation_checks(cfg: SmokeConfig, ckpt_dir: Path, tag: str, saved: dict,
                         out_path: Path) -> list[dict]:
    """Rank 0 only: merge the ZeRO shards, write safetensors, read back and compare."""
    from safetensors.torch import load_file

    merged = ds_engine.consolidate_fp32(ckpt_dir, tag)
    merged_diff = ds_engine.max_abs_diff({k: merged[k] for k in saved if k in merged}, saved)
    ds_engine.save_safetensors(merged, out_path, metadata={"checkpoint_tag": tag})
    file_diff = ds_engine.max_abs_diff(load_file(str(out_path)), merged)
    return [
        check("consolidated_keys", set(merged) == set(saved),
              missing=sorted(set(saved) - set(merged)), extra=sorted(set(merged) - set(saved))),
        check("consolidated_equals_trained", merged_diff <= cfg.atol, max_abs_diff=merged_diff),
        check("safetensors_roundtrip", file_diff == 0.0, max_abs_diff=file_diff),
    ]


def summarize(cfg: SmokeConfig, dist: DistInfo, stage: int, records: list[dict],
              checks: list[dict], wall_s: float) -> dict:
    times = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]  # step 1 warms up
    return {
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "steps": len(records),
        "mean_step_time_s": sum(times) / len(times),
        "first_step_time_s": records[0]["step_time_s"],
        "wall_time_s": wall_s,
        "zero_stage": stage,
        "world_size": dist.world_size,
        "backend": dist.backend,
        "global_batch_size": global_batch_size(cfg, dist),
        "checks": checks,
        "all_passed": all(c["passed"] for c in checks),
        "config": config_to_dict(cfg),
    }


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def run(cfg: SmokeConfig) -> int:
    wall_start = time.perf_counter()
    ds_config = ds_engine.resolve_ds_config(cfg.engine, cfg.optim)  # a bad JSON fails before any rendezvous
    dist = init_distributed()
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        ds_engine.save_ds_config(ds_config, out_dir / "deepspeed.json")
    barrier()

    engine = ds_engine.build_engine(build_model(cfg.model, cfg.seed), cfg.optim, cfg.engine)
    stage = ds_engine.zero_stage(engine)
    print_rank0(f"world size {dist.world_size} ({dist.backend}), ZeRO stage {stage}, "
                f"global batch {global_batch_size(cfg, dist)}")
    set_seed(cfg.seed, dist.rank)
    records = train(engine, cfg, dist, out_dir / "loss.jsonl")

    samples_seen = cfg.steps * global_batch_size(cfg, dist)
    tag = ds_engine.save_checkpoint(engine, ckpt_dir, cfg.steps, {"samples_seen": samples_seen})
    saved = ds_engine.full_state_dict(engine)
    cont_loss, cont_params = next_step(engine, cfg, dist, samples_seen)
    engine.destroy()
    del engine
    gc.collect()

    checks = [check("loss_decreased", records[-1]["loss"] < records[0]["loss"],
                    first=records[0]["loss"], last=records[-1]["loss"])]
    checks += resume_checks(cfg, dist, ckpt_dir, tag, saved, cont_loss, cont_params)
    barrier()  # every rank's checkpoint shard is on disk
    if dist.is_main:
        checks += consolidation_checks(cfg, ckpt_dir, tag, saved, out_dir / "consolidated" / "model.safetensors")
        summary = summarize(cfg, dist, stage, records, checks, time.perf_counter() - wall_start)
        atomic_write_json(out_dir / "summary.json", summary)
        print_rank0(f"summary: {out_dir / 'summary.json'}  all checks passed: {summary['all_passed']}")
    # Rank 0 alone ran the consolidation checks; agree on the verdict so every rank exits alike.
    passed = all_ranks_true(all(c["passed"] for c in checks))
    shutdown_distributed()
    return 0 if passed else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(parser, default="configs/smoke/lm_smoke.yaml")
    add_launcher_args(parser)
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(SmokeConfig, ds_engine.resolve_path(args.config), args.overrides)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
