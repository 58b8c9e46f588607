"""Train the unified model (one Llama decoder over text + image ids) under DeepSpeed ZeRO.

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 train/unified.py --config configs/unified/tiny.yaml
    torchrun --nproc_per_node 2 train/unified.py --config configs/unified/tiny.yaml engine.deepspeed_config=configs/deepspeed/zero3.json

Reads precomputed image codes (``python -m unified_mm.tokenizer_cli precompute``; the codes'
tokenizer hash must match ``data.tokenizer``), builds mixed-task sequences
(:mod:`unified_mm.data.mixture`: VQA, captioning, chat, text-to-image with caption dropout,
text-only, weights changing linearly over the run) and minimises the modality-separated
cross-entropy (:mod:`unified_mm.loss`). The loss of a micro-batch is the mean over its labelled
tokens on this rank; ranks are averaged by DeepSpeed.

Outputs in ``out_dir``: ``config.yaml`` (resolved), ``ds_config.json``, ``train_log.jsonl`` and
``tensorboard/`` (per-task losses, lr, tokens/s), ``checkpoints/`` (model, optimizer, scheduler,
every rank's data position and RNG: a rerun of the same command resumes), ``export/`` (HF-format
directory: what sampling and eval load) and ``metrics.json`` (held-out losses, greedy VQA).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script by a launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as tdist
from tqdm import tqdm

from mmcore.config import ConfigError, add_config_args, load_config, save_config
from mmcore.errors import UserError, cli_entry
from mmcore.io import atomic_write_json
from mmcore.text_tokenizer import TextTokenizer
from tokenizer.export import tokenizer_hash
from train import ds_engine
from train.distributed import (add_launcher_args, barrier, init_distributed,
                               print_rank0, set_seed, shutdown_distributed)
from train.budget import RunLength
from train.optim import cpu_autocast_dtype
from train.faults import (StepGuard, check_skip_fraction, merged_skip_summary, step_delay,
                          validate_fault_config)
from train.tokenizer import gather_positions
from train.unified_log import RunLogger
from unified_mm.data.mixture import MixedTaskStream, MixtureConfig, SourceConfig, eval_sequences, text_gain
from unified_mm.data.shards import SkipLog
from unified_mm.export import load_unified, save_unified
from unified_mm.loss import (modality_token_losses, modality_token_losses_from_hidden, per_task_losses,
                             weighted_mean_loss)
from unified_mm.model import UnifiedModelConfig, build_model, count_parameters
from unified_mm.quick_eval import greedy_vqa_accuracy, heldout_losses
from unified_mm.sequence import TASKS, SequenceBuilder, SequenceStats
from unified_mm.tokenizer_cli import read_manifest
from unified_mm.vocab import Vocab


@dataclasses.dataclass
class UnifiedDataConfig:
    tokenizer: str = "runs/tokenizer/stage2/export"  # QLIP export the codes were made with (bundled in the export)
    text_tokenizer: str = ""  # sentencepiece model; "" = the one in the tokenizer export
    sources: list = dataclasses.field(default_factory=lambda: [{"codes": "runs/codes", "split": "train"}])
    val: dict = dataclasses.field(default_factory=lambda: {"codes": "runs/codes", "split": "val"})
    max_length: int = 256  # tokens per sequence; longer samples are cut/dropped by the stated rules
    shuffle_buffer: int = 2000


@dataclasses.dataclass
class UnifiedTrainConfig:
    model: UnifiedModelConfig = dataclasses.field(default_factory=UnifiedModelConfig)
    data: UnifiedDataConfig = dataclasses.field(default_factory=UnifiedDataConfig)
    mixture: MixtureConfig = dataclasses.field(default_factory=MixtureConfig)
    optim: ds_engine.OptimConfig = dataclasses.field(default_factory=ds_engine.OptimConfig)
    engine: ds_engine.EngineConfig = dataclasses.field(default_factory=ds_engine.EngineConfig)
    steps: int = 1000  # with time_budget_s: the most steps the plan may reach
    # > 0: train for about this many seconds of training-loop wall time; the step count is planned
    # from the measured step time and the LR and mixture schedules end on it (train/budget.py)
    time_budget_s: float = 0.0
    # loss weight of image-id targets against 1 for text targets (unified_mm.loss.weighted_mean_loss);
    # 1 = plain token mean. Logged per-task losses are unweighted means either way.
    image_token_weight: float = 1.0
    stop_at: int = 0  # stop (with a checkpoint) before ``steps``; rerun the command to resume
    log_every: int = 10
    eval_every: int = 0  # held-out loss every N steps (0: only at the start and the end)
    eval_per_task: int = 64  # held-out sequences per task
    vqa_questions: int = 500  # greedy VQA questions after training (0: skip)
    save_every: int = 0  # checkpoint every N steps (0: only at the end / at stop_at)
    seed: int = 0
    resume: bool = True
    out_dir: str = "runs/unified"
    keep_last: int = 3  # complete checkpoints kept in out_dir/checkpoints (0: all)
    max_skip_fraction: float = 0.1  # stop when more of the samples read were skipped as unusable
    max_nonfinite_steps: int = 5  # stop after this many steps in a row with a non-finite loss/gradient

    def validate(self) -> None:
        if self.steps < 1 or self.log_every < 1:
            raise ConfigError("steps and log_every must be >= 1")
        if self.stop_at < 0 or self.save_every < 0 or self.eval_every < 0 or self.time_budget_s < 0:
            raise ConfigError("stop_at, save_every, eval_every and time_budget_s must be >= 0")
        if self.image_token_weight < 0:
            raise ConfigError(f"image_token_weight must be >= 0, got {self.image_token_weight}")
        if self.data.max_length < 8:
            raise ConfigError(f"data.max_length={self.data.max_length} is too small")
        validate_fault_config(self.max_skip_fraction, self.max_nonfinite_steps, self.keep_last)


def sources_of(cfg: UnifiedTrainConfig) -> list[SourceConfig]:
    sources = []
    for index, raw in enumerate(cfg.data.sources):
        if not isinstance(raw, dict) or "codes" not in raw:
            raise ConfigError(f"data.sources[{index}] must be a mapping with at least 'codes', got {raw!r}")
        unknown = set(raw) - {f.name for f in dataclasses.fields(SourceConfig)}
        if unknown:
            raise ConfigError(f"data.sources[{index}]: unknown keys {sorted(unknown)}; "
                              f"known: codes, split, tasks")
        sources.append(SourceConfig(**raw))
    return sources


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------

def text_tokenizer_path(cfg: UnifiedTrainConfig) -> Path:
    path = Path(cfg.data.text_tokenizer or Path(cfg.data.tokenizer) / "text_tokenizer.model")
    if not path.is_file():
        raise UserError(f"text tokenizer not found: {path} (set data.text_tokenizer)")
    return path


def build_vocab(cfg: UnifiedTrainConfig, text_tokenizer: TextTokenizer) -> Vocab:
    """The vocabulary from the text tokenizer and the first source's codes manifest."""
    manifest = read_manifest(sources_of(cfg)[0].codes)
    return Vocab.for_tokenizers(text_tokenizer.vocab_size, int(manifest["num_bits"]),
                                int(manifest["group_size"]), int(manifest["grid_size"]),
                                image_group_size=cfg.model.image_group_size)


class Setup:
    """Everything a run needs, built identically on every rank."""

    def __init__(self, cfg: UnifiedTrainConfig):
        self.cfg = cfg
        if not Path(cfg.data.tokenizer).is_dir():
            raise UserError(f"data.tokenizer={cfg.data.tokenizer} is not a tokenizer export directory")
        self.tokenizer_hash = tokenizer_hash(cfg.data.tokenizer)
        self.text_path = text_tokenizer_path(cfg)
        self.text_tokenizer = TextTokenizer(self.text_path)
        self.vocab = build_vocab(cfg, self.text_tokenizer)
        self.stats = SequenceStats()
        self.builder = SequenceBuilder(self.text_tokenizer, self.vocab, cfg.data.max_length, self.stats)
        self.sources = sources_of(cfg)
        self.val_source = SourceConfig(**{"tasks": list(TASKS), **cfg.data.val})


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

def train_step(engine, micro_batches, vocab: Vocab, guard: StepGuard | None = None,
               keys: list | None = None, step: int = 0, image_token_weight: float = 1.0,
               autocast_dtype: torch.dtype | None = None) -> dict:
    """One optimizer step; returns this rank's loss sums/counts per task and token count.

    ``autocast_dtype``: the forward runs under CPU autocast to it (``engine.cpu_autocast``); the
    loss is computed from the logits upcast per slice to float32 either way.

    With ``guard``, a non-finite loss on any rank skips step ``step`` (1-based) on every rank
    (:mod:`train.faults`); skipped micro-batches add nothing to the sums and ``"skipped"`` holds
    the reason (None when the step was applied).
    """
    sums = torch.zeros(len(TASKS), dtype=torch.float64)
    counts = torch.zeros(len(TASKS), dtype=torch.float64)
    tokens = 0
    if guard is not None:
        guard.begin(step)
    for index, batch in enumerate(micro_batches):
        token_losses = forward_losses(engine, batch, vocab, autocast_dtype)
        loss = weighted_mean_loss(token_losses, batch.labels, vocab, image_token_weight)
        if guard is None:
            engine.backward(loss)
            engine.step()
        elif not guard.backward_and_step(engine, loss, keys[index] if keys else ()):
            continue  # skipped on every rank: a non-finite loss somewhere
        task_sums, task_counts = per_task_losses(token_losses, batch.task_index.to(engine.device), len(TASKS))
        sums += task_sums.detach().double().cpu()
        counts += task_counts.detach().double().cpu()
        tokens += int(batch.attention_mask.sum())
    skipped = guard.end(engine) if guard is not None else None
    return {"sums": sums, "counts": counts, "tokens": tokens, "skipped": skipped}


def forward_losses(engine, batch, vocab: Vocab, autocast_dtype: torch.dtype | None):
    """Per-token losses of one micro-batch (:class:`unified_mm.loss.TokenLosses`).

    Under ZeRO 0-2 the output layer runs only at labelled positions (a conversation labels ~15 of
    ~200): the demo's 2-process steps took 6-17% less time in an A/B with the same losses
    (docs/notes/session7.md), and on a 64k-id QLIP vocabulary no (B, T, V) logits tensor is made.
    ZeRO-3 partitions the weights and fetches them around ``engine(...)``'s forward, so there the
    full logits come from the engine's own forward.
    """
    ids, mask = batch.ids.to(engine.device), batch.attention_mask.to(engine.device)
    labels = batch.labels.to(engine.device)
    with forward_autocast(autocast_dtype):
        if ds_engine.zero_stage(engine) < 3:
            hidden = engine.module.model(input_ids=ids, attention_mask=mask).last_hidden_state
            return modality_token_losses_from_hidden(hidden, engine.module.lm_head, labels, vocab)
        logits = engine(input_ids=ids, attention_mask=mask).logits
    return modality_token_losses(logits, labels, vocab)


def forward_autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def reduce_terms(terms: dict) -> dict:
    """Global (all-rank) per-task mean losses, overall loss and token count."""
    packed = torch.cat([terms["sums"], terms["counts"], torch.tensor([float(terms["tokens"])], dtype=torch.float64)])
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(packed)
    n = len(TASKS)
    sums, counts, tokens = packed[:n], packed[n: 2 * n], float(packed[-1])
    out = {f"loss/{task}": float(sums[i] / counts[i]) for i, task in enumerate(TASKS) if counts[i] > 0}
    out["loss"] = float(sums.sum() / counts.sum()) if counts.sum() > 0 else float("nan")  # nan: all skipped
    out["tokens"] = tokens
    return out


# Logged with the held-out losses: unconditional minus conditional t2i loss, summed over an
# image's scored ids (mixture.text_gain).
TEXT_GAIN_KEY = "eval/t2i_text_gain"


def run_eval(engine, setup: Setup, heldout: dict) -> dict:
    engine.eval()
    losses = heldout_losses(engine, setup.vocab, heldout, pad_id=setup.text_tokenizer.pad_id)
    engine.train()
    out = {f"eval/{task}": value for task, value in losses.items()}
    gain = text_gain(losses, heldout)
    if gain is not None:  # nats per image: what the caption tells the model about the whole image
        out[TEXT_GAIN_KEY] = gain
    return out


def save(engine, checkpoints: Path, step: int, stream: MixedTaskStream, stats: SequenceStats,
         keep_last: int = 0, length: RunLength | None = None) -> None:
    states = gather_positions(stream.state())
    budget = length.state() if length is not None else None
    ds_engine.save_checkpoint(engine, checkpoints, step, {"data": states, "sequence_stats": stats.summary(),
                                                          "time_budget": budget}, keep_last=keep_last)


class KeyedStream(MixedTaskStream):
    """:class:`MixedTaskStream` that remembers the sample keys behind each batch, so a step skipped
    for a non-finite loss can name them. Draws exactly what the plain stream draws."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drawn: list[str] = []

    def _draw_sample(self, source_index: int, task: str) -> tuple:
        sample = super()._draw_sample(source_index, task)
        self._drawn.append(str(sample[0]))
        return sample

    def next_keyed_batch(self, batch_size: int, step: int, pad_id: int):
        """(batch, keys of the samples drawn for it)."""
        self._drawn = []
        batch = self.next_batch(batch_size, step, pad_id)
        return batch, self._drawn


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def train(cfg: UnifiedTrainConfig, setup: Setup, rank: int) -> dict:
    out_dir = Path(cfg.out_dir)
    set_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, setup.vocab, text_pieces=setup.text_tokenizer.n_text)
    params = count_parameters(model)
    print_rank0(f"unified model: {params['total'] / 1e6:.2f}M parameters ({params['non_embedding'] / 1e6:.2f}M "
                f"non-embedding), vocab {setup.vocab.size} ({setup.vocab.image_start} text+special, "
                f"{setup.vocab.num_groups}x{setup.vocab.group_vocab} image)")
    optim = dataclasses.replace(cfg.optim, total_steps=max(cfg.steps, cfg.optim.warmup_steps))
    ds_config = ds_engine.resolve_ds_config(cfg.engine, optim)
    engine = ds_engine.build_engine(model, optim, cfg.engine, ds_config=ds_config)
    if rank == 0:
        ds_engine.save_ds_config(ds_config, out_dir / "ds_config.json")
    checkpoints = out_dir / "checkpoints"
    step, data_state, budget_state = 0, None, None
    tag = ds_engine.resume_checkpoint_tag(checkpoints) if cfg.resume else None  # newest complete one
    if tag is not None:
        state = ds_engine.load_checkpoint(engine, checkpoints, tag)
        step, data_state, budget_state = state["step"], state["data"][rank], state.get("time_budget")
        print_rank0(f"resumed from {checkpoints / tag} at step {step}")
    else:
        set_seed(cfg.seed, rank=rank)
    skip_log = SkipLog()
    guard = StepGuard(cfg.max_nonfinite_steps, log=lambda message: print_rank0(f"warning: {message}"))
    stream = KeyedStream(setup.sources, cfg.mixture, setup.builder, tokenizer_hash=setup.tokenizer_hash,
                         total_steps=cfg.steps, seed=cfg.seed, rank=rank, shuffle_buffer=cfg.data.shuffle_buffer,
                         state=data_state, skip_log=skip_log)
    heldout = eval_sequences(setup.val_source, cfg.mixture, setup.builder, tokenizer_hash=setup.tokenizer_hash,
                             per_task=cfg.eval_per_task, seed=cfg.seed)
    logger = RunLogger(out_dir, enabled=rank == 0, resume_step=step)
    first_eval = None
    if step == 0:
        first_eval = run_eval(engine, setup, heldout)
        logger.log(0, first_eval)
    length = RunLength(cfg.steps, cfg.time_budget_s, engine.lr_scheduler, min_steps=cfg.optim.warmup_steps + 1,
                       state=budget_state, start_step=step)
    bar = tqdm(total=length.total, initial=step, desc="unified", unit="step", disable=rank != 0, dynamic_ncols=True)
    length.track(bar)
    length.on_change(lambda total: setattr(stream, "total_steps", total))  # the mixture schedule
    window, window_steps, window_start = None, 0, time.perf_counter()
    length.start_clock()
    pad_id = setup.text_tokenizer.pad_id
    autocast_dtype = cpu_autocast_dtype(cfg.engine, engine.device)
    if autocast_dtype is not None:
        print_rank0(f"training forward under CPU autocast to {autocast_dtype} "
                    f"(engine.cpu_autocast={cfg.engine.cpu_autocast})")
    while step < length.end(cfg.stop_at):
        micro = [stream.next_keyed_batch(cfg.engine.micro_batch_size, step, pad_id)
                 for _ in range(cfg.engine.grad_accum_steps)]
        terms = train_step(engine, [batch for batch, _ in micro], setup.vocab, guard=guard,
                           keys=[keys for _, keys in micro], step=step + 1,
                           image_token_weight=cfg.image_token_weight, autocast_dtype=autocast_dtype)
        skipped = terms.pop("skipped")
        window = terms if window is None else {k: window[k] + terms[k] for k in terms}
        window_steps += 1
        step += 1
        bar.update(1)
        check_skip_fraction(skip_log, cfg.max_skip_fraction, what="unified training data")  # collective
        if skipped:
            logger.log(step, {"skipped": skipped, "skipped_keys": guard.last_event["keys"]})
        if step % cfg.log_every == 0 or step == length.end(cfg.stop_at):
            record = reduce_terms(window)  # collective: every rank; means over the window's steps
            seconds = time.perf_counter() - window_start
            record.update(lr=ds_engine.current_lr(engine), tokens_per_s=record.pop("tokens") / seconds,
                          step_s=seconds / window_steps)
            if length.budget is not None:
                record["planned_steps"] = length.update(step)  # collective
            logger.log(step, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window, window_steps, window_start = None, 0, time.perf_counter()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < length.total:
            logger.log(step, run_eval(engine, setup, heldout))
        if cfg.save_every and step % cfg.save_every == 0 and step < length.end(cfg.stop_at):
            save(engine, checkpoints, step, stream, setup.stats, cfg.keep_last, length)
        step_delay()  # TEST HOOK: QLIP_FAULT_STEP_DELAY_S
    bar.close()
    save(engine, checkpoints, step, stream, setup.stats, cfg.keep_last, length)
    skipped_samples, samples_read = merged_skip_summary(skip_log)  # collective: all ranks' counts
    summary = {"steps": step, "skipped_samples": skipped_samples, "samples_read": samples_read,
               "nonfinite_steps": guard.summary(), "sequence_stats": setup.stats.summary(),
               "passed_over": stream.passed_over, "parameters": params, "planned_steps": length.total,
               "steps_cap": cfg.steps, "time_budget": length.state(),
               "cpu_autocast": None if autocast_dtype is None else str(autocast_dtype).replace("torch.", "")}
    if step < length.total:
        print_rank0(f"stopped at step {step} (stop_at); rerun the same command to resume")
        logger.close()
        return summary
    final_eval = run_eval(engine, setup, heldout)
    logger.log(step, final_eval)
    logger.close()
    summary.update(first_eval=first_eval, final_eval=final_eval)
    state_dict = ds_engine.full_state_dict(engine)  # collective
    if rank == 0:
        summary["export"] = str(save_unified(
            engine.module, setup.vocab, out_dir / "export", text_tokenizer_path=setup.text_path,
            tokenizer_dir=cfg.data.tokenizer, state_dict=state_dict, overwrite=True,
            metadata={"steps": step, "preset": cfg.model.preset, "train_config": str(out_dir / "config.yaml")}))
    return summary


def final_metrics(cfg: UnifiedTrainConfig, setup: Setup, summary: dict) -> dict:
    """Rank 0, after export: reload the export (checks it) and answer held-out questions."""
    loaded = load_unified(summary["export"])
    builder = SequenceBuilder(loaded.text_tokenizer, loaded.vocab, cfg.data.max_length)
    metrics = {"export_hash": loaded.hash, "tokenizer_hash": setup.tokenizer_hash,
               **{k: v for k, v in summary.items() if k != "export"}, "export": summary["export"]}
    if cfg.vqa_questions > 0:
        val = setup.val_source
        metrics["vqa_greedy"] = greedy_vqa_accuracy(loaded.model, builder, val.codes, val.split,
                                                    tokenizer_hash=setup.tokenizer_hash,
                                                    max_questions=cfg.vqa_questions, seed=cfg.seed)
    return metrics


def print_summary(metrics: dict) -> None:
    first, final = metrics.get("first_eval") or {}, metrics.get("final_eval") or {}
    for key in sorted(set(final) - {TEXT_GAIN_KEY}):
        start = f"{first[key]:.3f} -> " if key in first else ""
        print_rank0(f"  held-out {key}: {start}{final[key]:.3f}")
    if TEXT_GAIN_KEY in final:
        print_rank0(f"  held-out text-to-image loss without the caption minus with it: "
                    f"{final[TEXT_GAIN_KEY]:.2f} nats per image (near 0: the caption is ignored)")
    if "vqa_greedy" in metrics:
        vqa = metrics["vqa_greedy"]
        by_type = ", ".join(f"{k} {v:.1%}" for k, v in vqa["by_type"].items())
        print_rank0(f"  greedy VQA on val: {vqa['accuracy']:.1%} of {vqa['questions']} ({by_type})")
    if metrics.get("time_budget"):
        budget = metrics["time_budget"]
        print_rank0(f"  time budget {budget['budget_s']:.0f} s: {metrics['steps']} steps planned and run "
                    f"in {budget['spent_s']:.0f} s (cap {metrics.get('steps_cap', '?')})")
    if metrics.get("skipped_samples"):
        print_rank0(f"  skipped samples: {metrics['skipped_samples']} of {metrics.get('samples_read')} read")
    if (metrics.get("nonfinite_steps") or {}).get("skipped_steps"):
        print_rank0(f"  non-finite steps skipped: {metrics['nonfinite_steps']['by_reason']}")
    print_rank0(f"  export: {metrics['export']} (hash {metrics['export_hash']})")


def run(cfg: UnifiedTrainConfig) -> int:
    dist = init_distributed()
    out_dir = Path(cfg.out_dir)
    setup = Setup(cfg)  # checks paths and hashes before any work
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    barrier()
    summary = train(cfg, setup, dist.rank)
    if dist.is_main and "export" in summary:
        metrics = final_metrics(cfg, setup, summary)
        atomic_write_json(out_dir / "metrics.json", metrics)
        print_summary(metrics)
    barrier()
    shutdown_distributed()
    return 0


@cli_entry
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default="configs/unified/tiny.yaml")
    add_launcher_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config(UnifiedTrainConfig, args.config, args.overrides)
    sources_of(cfg)  # config errors before the processes connect
    ds_engine.load_ds_json(cfg.engine.deepspeed_config)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
