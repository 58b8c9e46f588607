"""Train the QLIP tokenizer, stage 1 or stage 2, under DeepSpeed (or one plain process).

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 train/tokenizer.py --config configs/tokenizer/tiny_stage1.yaml
    torchrun --nproc_per_node 2 train/tokenizer.py --config configs/tokenizer/tiny_stage2.yaml \\
        init_from=runs/tokenizer/stage1/export

Stage 1 trains everything with ``recon·MSE + align·CLIP + quantizer·BSQ`` (the CLIP loss over the
global batch, duplicates of a caption counted as positives). ``balance.mode: auto`` first runs two
short pilots (recon-only, align-only) and sets ``recon/align = L_align / L_mse`` from their final
losses, as QLIP does (paper: αa = 1, αr = 10³); the pilots' result is saved in ``balance.json``.
Stage 2 loads a stage-1 export, drops the text tower, freezes the encoder and fine-tunes the
bottleneck MLPs and decoder with ``recon·MSE + quantizer·BSQ + perceptual + GAN`` (a patch
discriminator trained alongside with an R1 penalty); its export re-attaches the unchanged stage-1
text tower so one directory serves reconstruction and zero-shot.

Outputs in ``out_dir``: ``config.yaml`` (resolved), ``train_log.jsonl``, ``checkpoints/`` (resume:
model, optimizer, scheduler, data positions, RNG), ``export/`` (config.json + model.safetensors +
text tokenizer: what everything else loads) and ``metrics.json`` (validation metrics).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by a launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as tdist
from tqdm import tqdm

from mmcore.config import ConfigError, add_config_args, config_to_dict, load_config, save_config
from mmcore.errors import UserError, cli_entry
from mmcore.io import atomic_write_json, atomic_write_text
from mmcore.text_tokenizer import TextTokenizer
from tokenizer.export import load_tokenizer, save_tokenizer
from tokenizer.qlip import QLIP, preset_config
from train import ds_engine
from train.budget import RunLength
from train.distributed import (add_launcher_args, all_reduce_mean, barrier, init_distributed,
                               print_rank0, set_seed, shutdown_distributed)
from train.faults import StepGuard, check_skip_fraction, merged_skip_summary, step_delay
# the config schema lives in the deepspeed-free train.tokenizer_config; re-exported from here
from train.tokenizer_config import (BalanceConfig, LossWeights, TokenizerTrainConfig,  # noqa: F401
                                    lr_prefixes)
from train.tokenizer_data import image_text_batches
from train.tokenizer_steps import StageRunner
from unified_mm.data.shards import SkipLog
from unified_mm.tokenizer_eval import evaluate_tokenizer


# ---------------------------------------------------------------------------------------------
# Model and engine
# ---------------------------------------------------------------------------------------------

def build_stage_model(cfg: TokenizerTrainConfig, text_tokenizer: TextTokenizer | None) -> tuple[QLIP, QLIP | None]:
    """(model to train, stage-1 model whose text tower the export re-attaches or None)."""
    if cfg.stage == 1:
        config = preset_config(cfg.preset, cfg.model)
        if config.text is not None and text_tokenizer is not None \
                and config.text.vocab_size < text_tokenizer.vocab_size:
            raise ConfigError(f"model.text.vocab_size={config.text.vocab_size} is smaller than the text "
                              f"tokenizer's {text_tokenizer.vocab_size} ids ({text_tokenizer.model_path})")
        return QLIP(config), None
    stage1 = load_tokenizer(cfg.init_from).model
    model = QLIP(dataclasses.replace(stage1.config))
    model.load_state_dict(stage1.state_dict())
    model.freeze_encoder(codes_too=cfg.freeze_codes).drop_text()
    return model.train(), stage1


# ---------------------------------------------------------------------------------------------
# One training run (also used for the balancing pilots)
# ---------------------------------------------------------------------------------------------

def train_run(cfg: TokenizerTrainConfig, weights: LossWeights, steps: int, out_dir: Path, *,
              text_tokenizer: TextTokenizer | None, rank: int, export: bool, desc: str) -> dict:
    """Train ``steps`` steps in ``out_dir`` (resuming there if possible); returns a summary."""
    set_seed(cfg.seed)  # identical initial weights on every rank
    model, stage1 = build_stage_model(cfg, text_tokenizer)
    optim = dataclasses.replace(cfg.optim, total_steps=max(steps, cfg.optim.warmup_steps))
    runner = StageRunner(cfg, model, weights, optim, lr_prefixes(cfg.lr_mult))
    checkpoints = out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    step, positions, budget_state = 0, None, None
    tag = ds_engine.resume_checkpoint_tag(checkpoints) if cfg.resume else None  # newest complete one
    if tag is not None:
        state = runner.load(checkpoints, tag)  # restores this rank's RNG too
        step, positions, budget_state = state["step"], state["positions"], state.get("time_budget")
        print_rank0(f"[{desc}] resumed from {checkpoints / tag} at step {step}")
    else:
        set_seed(cfg.seed, rank=rank)
    skip_log = SkipLog()
    guard = StepGuard(cfg.max_nonfinite_steps, log=lambda message: print_rank0(f"[{desc}] warning: {message}"))
    config = model.config
    context = config.text.context_length if config.text is not None else 0
    batches = image_text_batches(cfg.data, text_tokenizer if cfg.stage == 1 else None,
                                 cfg.engine.micro_batch_size, context, config.encoder.image_size,
                                 seed=cfg.seed, rank=rank, start=positions[rank] if positions else 0,
                                 skip_log=skip_log)
    log_path = out_dir / "train_log.jsonl"
    if rank == 0:
        truncate_log(log_path, step)
    history: list[dict] = []
    # the main run may be budgeted in seconds (train/budget.py); the pilots always run pilot_steps
    length = RunLength(steps, cfg.time_budget_s if export else 0.0, runner.engine.lr_scheduler,
                       min_steps=cfg.optim.warmup_steps + 1, state=budget_state, start_step=step)
    bar = tqdm(total=length.total, initial=step, desc=desc, disable=rank != 0, unit="step", dynamic_ncols=True)
    length.track(bar)
    start_time, position = time.perf_counter(), positions[rank] if positions else 0
    length.start_clock()
    while step < length.end(cfg.stop_at if export else 0):
        micro = [next(batches) for _ in range(cfg.engine.grad_accum_steps)]
        position = micro[-1].end_position
        terms = runner.step(micro, step, guard)  # a non-finite step is skipped on every rank
        step += 1
        bar.update(1)
        check_skip_fraction(skip_log, cfg.max_skip_fraction, what=f"{desc}: {cfg.data.data}")  # collective
        if step % cfg.log_every == 0 or step == length.total or runner.last_skip:
            record = {"step": step, **{k: all_reduce_mean(v) for k, v in sorted(terms.items())},
                      "lr": ds_engine.current_lr(runner.engine),
                      "elapsed_s": round(time.perf_counter() - start_time, 2)}
            if length.budget is not None:
                record["planned_steps"] = length.update(step)  # collective
            if runner.last_skip:
                record.update(skipped=runner.last_skip, skipped_keys=guard.last_event["keys"])
            else:
                history.append(record)
            if rank == 0:
                bar.set_postfix(loss=f"{record.get('total', float('nan')):.3f}",
                                psnr=f"{record.get('psnr_db', 0):.1f}")
                with open(log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
        if cfg.save_every and step % cfg.save_every == 0 and step < length.total:
            runner.save(checkpoints, step, gather_positions(position), cfg.keep_last, length.state())
        step_delay()  # TEST HOOK: QLIP_FAULT_STEP_DELAY_S
    bar.close()
    runner.save(checkpoints, step, gather_positions(position), cfg.keep_last, length.state())
    skipped, samples_read = merged_skip_summary(skip_log)  # collective: all ranks' counts
    summary = {"steps": step, "history": history, "skipped": skipped, "samples_read": samples_read,
               "nonfinite": guard.summary(), "time_budget": length.state()}
    if step < length.total:
        print_rank0(f"[{desc}] stopped at step {step} (stop_at); rerun the same command to resume")
        return summary
    state_dict = ds_engine.full_state_dict(runner.engine)  # collective
    if export and rank == 0:
        summary["export"] = str(export_model(cfg, model, stage1, state_dict, out_dir, weights, step))
    del runner
    return summary


def truncate_log(log_path: Path, last_step: int) -> None:
    """Keep only records up to ``last_step`` (0: a fresh run starts an empty log; on resume, the
    steps logged after the checkpoint by the interrupted run are dropped, as they are redone).
    A line torn by a kill in the middle of a write is dropped too."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # torn or garbled line (the process was killed while appending it)
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
    atomic_write_text(log_path, "".join(line + "\n" for line in kept))


def gather_positions(position: int) -> list[int]:
    """Every rank's stream position (checkpoints are written by rank 0 only)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return [position]
    positions: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(positions, position)
    return positions


def export_model(cfg: TokenizerTrainConfig, model: QLIP, stage1: QLIP | None, state_dict: dict,
                 out_dir: Path, weights: LossWeights, steps: int) -> Path:
    """Write ``out_dir/export``; stage 2 re-attaches the (unchanged) stage-1 text tower."""
    metadata = {"stage": cfg.stage, "steps": steps, "preset": cfg.preset,
                "loss_weights": config_to_dict(weights)}
    text_path = Path(cfg.init_from) / "text_tokenizer.model" if cfg.stage == 2 else Path(cfg.data.text_tokenizer)
    if stage1 is not None and stage1.text is not None:
        full = QLIP(stage1.config)
        merged = {**stage1.state_dict(), **state_dict}  # trained weights over the stage-1 ones
        return save_tokenizer(full, out_dir / "export", state_dict=merged, text_tokenizer_path=text_path,
                              metadata=metadata)
    return save_tokenizer(model, out_dir / "export", state_dict=state_dict,
                          text_tokenizer_path=text_path if model.text is not None else None, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Balancing pilots
# ---------------------------------------------------------------------------------------------

def auto_balance(cfg: TokenizerTrainConfig, out_dir: Path, text_tokenizer, rank: int) -> LossWeights:
    """QLIP's balancing: αr / αa = L_align(∞) / L_mse(∞) from recon-only and align-only pilots."""
    path = out_dir / "balance.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        print_rank0(f"balance: reusing {path}: recon {saved['recon']:.4g}, align {saved['align']:.4g}")
        return dataclasses.replace(cfg.weights, recon=saved["recon"], align=saved["align"])
    finals = {}
    for name, pilot_weights, key in (("recon-only", dataclasses.replace(cfg.weights, align=0.0), "recon"),
                                     ("align-only", dataclasses.replace(cfg.weights, recon=0.0), "align")):
        summary = train_run(cfg, pilot_weights, cfg.balance.pilot_steps, out_dir / f"pilot_{key}",
                            text_tokenizer=text_tokenizer, rank=rank, export=False, desc=f"pilot {name}")
        tail = [r[key] for r in summary["history"]][-max(1, cfg.balance.pilot_tail // cfg.log_every):]
        finals[key] = sum(tail) / len(tail)
    align = cfg.weights.align
    recon = align * finals["align"] / max(finals["recon"], 1e-12)
    result = {"recon": recon, "align": align, "pilot_final_mse": finals["recon"],
              "pilot_final_align": finals["align"], "pilot_steps": cfg.balance.pilot_steps}
    if rank == 0:
        atomic_write_json(path, result)
    print_rank0(f"balance: L_align={finals['align']:.4f}, L_mse={finals['recon']:.5f} -> "
                f"recon weight {recon:.4g} (align {align:.4g})")
    return dataclasses.replace(cfg.weights, recon=recon, align=align)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def run(cfg: TokenizerTrainConfig) -> int:
    dist = init_distributed()
    out_dir = Path(cfg.out_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    barrier()
    text_tokenizer = TextTokenizer(cfg.data.text_tokenizer) if cfg.stage == 1 else None
    weights = cfg.weights
    if cfg.balance.mode == "auto":
        weights = auto_balance(cfg, out_dir, text_tokenizer, dist.rank)
    summary = train_run(cfg, weights, cfg.steps, out_dir, text_tokenizer=text_tokenizer, rank=dist.rank,
                        export=True, desc=f"tokenizer stage {cfg.stage}")
    if dist.is_main and "export" in summary:
        loaded = load_tokenizer(summary["export"])
        metrics = evaluate_tokenizer(loaded.model, loaded.text_tokenizer, cfg.data.data, cfg.data.val_split,
                                     max_images=cfg.eval_images)
        result = {"metrics": metrics, "tokenizer_hash": loaded.hash, "loss_weights": config_to_dict(weights),
                  "steps": summary["steps"], "steps_cap": cfg.steps, "time_budget": summary["time_budget"],
                  "skipped_samples": summary["skipped"],
                  "samples_read": summary["samples_read"], "nonfinite_steps": summary["nonfinite"],
                  "final_train": summary["history"][-1] if summary["history"] else {}}
        atomic_write_json(out_dir / "metrics.json", result)
        print_rank0("metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in metrics.items()))
        if summary["skipped"]:
            print_rank0(f"skipped samples: {summary['skipped']} of {summary['samples_read']} read")
        if summary["nonfinite"]["skipped_steps"]:
            print_rank0(f"non-finite steps skipped: {summary['nonfinite']['by_reason']}")
        print_rank0(f"export: {summary['export']}  (hash {loaded.hash})")
    barrier()
    shutdown_distributed()
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default="configs/tokenizer/tiny_stage1.yaml")
    add_launcher_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
    if cfg.stage == 1 and not Path(cfg.data.text_tokenizer).is_file():
        raise UserError(f"data.text_tokenizer={cfg.data.text_tokenizer} not found "
                        "(train one with python -m train.text_tokenizer)")
    ds_engine.load_ds_json(cfg.engine.deepspeed_config)  # fail before the processes connect
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
