"""Bench/sweep tool (not a trainer): which stage-1 settings of the tiny QLIP tokenizer help, at a fixed budget.

    python bench/tokenizer_sweep.py [--out DIR] [--only baseline,short_captions] [--jobs 8]
    python bench/tokenizer_sweep.py --only baseline,short_captions --steps 3 --eval-images 50 \\
        --data /tmp/sw2k --text-tokenizer /tmp/sw2k.model --data-overrides splits.train=2000   # smoke

Each variant of ``bench/tokenizer_sweep.yaml`` (a name + dotted overrides on
``configs/tokenizer/tiny_stage1.yaml``, loaded with the project's config loader exactly as
``train/tokenizer.py`` loads its YAML) trains tokenizer stage 1 from the same seed on the same data
stream, then is evaluated with the project's own ``evaluate_tokenizer`` on the val split (zero-shot
colour+shape accuracy, PSNR, pixel-judge accuracy on reconstructions, code entropy). The training
step is the project's: the model (``tokenizer.qlip``), the batch stream
(``train.tokenizer_data.image_text_batches``), the stage-1 loss (``train.tokenizer_loss``, the same
function ``StageRunner`` calls), AdamW over ``train.optim.param_groups`` with the per-part
``lr_mult`` (Muon + AdamW when the YAML says ``optim.name: muon``) and the ``WarmupCosine``
schedule, global-norm clipping. One step sees
``engine.micro_batch_size x ranks x engine.grad_accum_steps`` images (``ranks: 2`` in the sweep
YAML = the demo's 2 processes), and the CLIP loss runs over ``micro_batch_size x ranks`` images, as
the demo's gathered global batch does.

**Why no DeepSpeed.** This is a measuring tool meant to run on whatever machine is at hand,
including a GPU box without ``deepspeed`` installed; the tiny model needs no sharding, and one
process with the whole global batch computes the same loss and gradients as the demo's
data-parallel ZeRO-2 run (MSE and BSQ statistics over the global batch, CLIP over the gathered batch).
So it imports only the deepspeed-free modules (``train.optim``, ``train.tokenizer_config``,
``train.tokenizer_loss``, ``train.tokenizer_data``), never ``train.tokenizer`` or ``train.ds_engine``.
What differs from the demo: one process reads the shards instead of two (a different, equally
shuffled order), and on CUDA matmuls use TF32 (``--no-tf32`` for strict fp32) with fused AdamW.
Measured caveat (session 13, ``docs/measurements/sweep_zs_gpu.md``): single runs are chaotic. The
same seed and data order on CPU (fp32) and GPU (TF32) gave 83.7 vs 74.7% and 74.7 vs 84.3%
zero-shot at 1,100 x 64 steps; the means agree. Compare settings over several seeds
(``<setting>_s<seed>`` variants get a per-setting table), and check a gain in the trainer:
reconstruction weight 50's +8.3 points paired over 6 seeds here came out as +2.9 over 6 seeds there.

Data: ShapesWorld (``configs/data/shapesworld.yaml``) and the sentencepiece text tokenizer
(``configs/text_tokenizer.yaml``) are built with the project's CLIs when ``--data`` /
``--text-tokenizer`` do not exist yet (``--data-overrides`` go to the data generator, e.g.
``splits.train=2000`` for a quick smoke run; an existing dataset built with other settings is an
error, not silently reused).

Outputs in ``--out``: ``sweep.jsonl`` (one row per finished variant, appended as soon as it
finishes: a timeout keeps what is done), ``sweep.md`` (rewritten after every variant: a table
sorted by zero-shot accuracy) and ``variants/<name>/`` (resolved ``config.yaml``,
``train_log.jsonl``, ``result.json``, ``worker.log`` with ``--jobs > 1``, ``export/`` with
``--export``). A variant that fails is recorded with its error and the sweep goes on.
``--jobs N`` runs N variants at once as subprocesses (the tiny model leaves a big GPU mostly idle;
the data stream and evaluation are CPU-bound), longest first. ``--time-limit S`` stops training
variants still running after S seconds (rows with status ``timeout``) so ``sweep.md`` is always
written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mmcore.config import ConfigError, load_config, save_config  # noqa: E402
from mmcore.errors import UserError, cli_entry  # noqa: E402
from mmcore.io import atomic_write_json  # noqa: E402
from mmcore.text_tokenizer import TextTokenizer  # noqa: E402
from tokenizer.qlip import QLIP, count_parameters, preset_config  # noqa: E402
from train.distributed import set_seed  # noqa: E402  (deepspeed is imported lazily there, never here)
from train.optim import WarmupCosine, build_optimizer, param_groups  # noqa: E402
from train.tokenizer_config import TokenizerTrainConfig, lr_prefixes  # noqa: E402
from train.tokenizer_data import image_text_batches, with_negatives  # noqa: E402
from train.tokenizer_loss import stage1_loss_terms  # noqa: E402

from bench.sweep_data import DATA_CONFIG, Prefetch, ensure_data  # noqa: E402
from bench.sweep_report import Results, summary_line  # noqa: E402

DEFAULT_SWEEP = "bench/tokenizer_sweep.yaml"
FINAL_KEYS = ("total", "recon", "align", "quantizer", "psnr_db", "i2t_acc", "t2i_acc", "code_entropy_bits")


# ---------------------------------------------------------------------------------------------
# Sweep file
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Variant:
    name: str
    overrides: list[str] = dataclasses.field(default_factory=list)  # dotted, as on train/tokenizer.py's CLI
    note: str = ""


@dataclasses.dataclass
class SweepConfig:
    base: str = "configs/tokenizer/tiny_stage1.yaml"  # relative to the repo root
    ranks: int = 2  # data-parallel processes of the run being imitated: batch = micro_batch_size x ranks
    common: list[str] = dataclasses.field(default_factory=list)
    variants: list[Variant] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        if self.ranks < 1:
            raise ConfigError(f"ranks must be >= 1, got {self.ranks}")
        names = [v.name for v in self.variants]
        if not names:
            raise ConfigError("the sweep has no variants")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"duplicate variant names: {duplicates}")
        bad = [n for n in names if not n or "/" in n or n.startswith(".") or "," in n]
        if bad:
            raise ConfigError(f"variant names must be non-empty, without '/' or ',': {bad}")


def repo_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() or path.exists() else ROOT / path


def variant_overrides(args, sweep: SweepConfig, variant: Variant) -> list[str]:
    """Every override of one variant's run, in the order they apply."""
    extra = [f"steps={args.steps}"] if args.steps else []
    extra += [f"eval_images={args.eval_images}"] if args.eval_images else []
    return [f"data.data={args.data}", f"data.text_tokenizer={args.text_tokenizer}",
            *sweep.common, *variant.overrides, *extra]


def variant_config(args, sweep: SweepConfig, variant: Variant) -> TokenizerTrainConfig:
    cfg = load_config(TokenizerTrainConfig, repo_path(sweep.base), variant_overrides(args, sweep, variant))
    if cfg.stage != 1:
        raise ConfigError(f"variant {variant.name}: the sweep trains stage 1 only, got stage={cfg.stage}")
    preset_config(cfg.preset, cfg.model)  # checks the model overrides too
    return cfg


def global_batch(cfg: TokenizerTrainConfig, ranks: int) -> int:
    return cfg.engine.micro_batch_size * ranks * cfg.engine.grad_accum_steps


# ---------------------------------------------------------------------------------------------
# One variant: train, evaluate
# ---------------------------------------------------------------------------------------------

class Deadline(Exception):
    """The sweep's --time-limit passed while this variant was training."""


def train_variant(cfg: TokenizerTrainConfig, ranks: int, device: torch.device, out_dir: Path,
                  deadline: float = 0.0, export: bool = False) -> dict:
    """Stage 1 of one config in a plain PyTorch loop; returns the result row's measured fields."""
    from unified_mm.tokenizer_eval import evaluate_tokenizer

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    text_tokenizer = TextTokenizer(cfg.data.text_tokenizer)
    set_seed(cfg.seed)  # same initial weights for every variant of the same shape
    config = preset_config(cfg.preset, cfg.model)
    if config.text is not None and config.text.vocab_size < text_tokenizer.vocab_size:
        raise ConfigError(f"model.text.vocab_size={config.text.vocab_size} is smaller than the text "
                          f"tokenizer's {text_tokenizer.vocab_size} ids")
    model = QLIP(config).to(device).train()
    weights, steps, accum = cfg.weights, cfg.steps, cfg.engine.grad_accum_steps
    optim = dataclasses.replace(cfg.optim, total_steps=max(steps, cfg.optim.warmup_steps))  # as train_run
    schedule = WarmupCosine(optim.warmup_steps, optim.total_steps, optim.min_lr_ratio)
    if optim.name == "muon":  # as train_run (train.optim.build_optimizer)
        optimizer = build_optimizer(model, optim, lr_prefixes(cfg.lr_mult))
    else:  # AdamW, fused on CUDA (torch.optim.Muon has no fused kernel)
        groups = param_groups(model, optim.weight_decay, optim.lr, lr_prefixes(cfg.lr_mult))
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                      fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    use_text = weights.align > 0 and model.text is not None
    batch_size = cfg.engine.micro_batch_size * ranks  # one forward = the demo's gathered global micro-batch
    context = config.text.context_length if config.text is not None else 0
    set_seed(cfg.seed, rank=0)
    batches = Prefetch(image_text_batches(cfg.data, text_tokenizer, batch_size, context,  # as train_run, stage 1
                                          config.encoder.image_size, seed=cfg.seed, rank=0))
    log_path = out_dir / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    window: dict[str, torch.Tensor] = {}
    window_steps, history = 0, []
    train_start = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            optimizer.zero_grad(set_to_none=True)
            for _ in range(accum):
                batch = next(batches)
                pixels = batch.pixels.to(device, non_blocking=True)
                text_ids = mask = None
                if use_text:
                    text_ids, mask = (t.to(device, non_blocking=True) for t in with_negatives(batch))
                out = model(pixels, text_ids, mask)
                total, terms = stage1_loss_terms(model, out, pixels, batch.labels, weights,
                                                 batch.negative_labels if use_text else None)
                (total / accum).backward()  # DeepSpeed also divides by the accumulation steps
                terms["total"] = total
                for key, value in terms.items():
                    value = value.detach().float() / accum
                    window[key] = window[key] + value if key in window else value
            if optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            optimizer.step()
            scheduler.step()
            window_steps += 1
            if step % cfg.log_every == 0 or step == steps:  # floats (a device sync) only here
                record = {"step": step, **{k: float(v) / window_steps for k, v in sorted(window.items())},
                          "lr": optim.lr * schedule(step),  # after the step, as train/tokenizer.py logs it
                          "elapsed_s": round(time.perf_counter() - train_start, 2)}
                history.append(record)
                with open(log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                window, window_steps = {}, 0
                if not all(math.isfinite(v) for v in record.values()):
                    raise FloatingPointError(f"non-finite training loss at step {step}: {record}")
            if deadline and time.time() > deadline:
                raise Deadline(f"--time-limit reached at step {step}/{steps}")
    finally:
        batches.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - train_start
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    model = model.cpu()  # the evaluation (and the pixel judge) works on CPU tensors
    eval_start = time.perf_counter()
    metrics = evaluate_tokenizer(model, text_tokenizer, cfg.data.data, cfg.data.val_split,
                                 max_images=cfg.eval_images, progress=False)
    eval_seconds = time.perf_counter() - eval_start
    if export:
        from tokenizer.export import save_tokenizer
        save_tokenizer(model, out_dir / "export", text_tokenizer_path=cfg.data.text_tokenizer,
                       metadata={"stage": 1, "steps": steps, "preset": cfg.preset, "sweep": True})
    final = history[-1] if history else {}
    return {
        "steps": steps, "batch": batch_size * accum, "clip_batch": batch_size,
        "seconds": round(time.perf_counter() - start, 2), "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2), "step_ms": round(1000 * train_seconds / steps, 1),
        "device": str(device), "peak_gpu_mem_mb": round(peak_mb) if peak_mb is not None else None,
        "parameters": count_parameters(model)["total"],
        "final_train": {k: final[k] for k in FINAL_KEYS if k in final},
        **{k: metrics.get(k) for k in ("zero_shot_acc", "psnr_db", "judge_recon_acc", "code_entropy_fraction",
                                       "code_entropy_bits", "distinct_codes", "zero_shot_images", "images")},
    }


def run_variant(args, sweep: SweepConfig, variant: Variant, deadline: float) -> dict:
    """One variant, never raising (except on Ctrl-C): the row, ok or with its error."""
    row = {"variant": variant.name, "overrides": variant.overrides, "status": "ok"}
    start = time.perf_counter()
    out_dir = Path(args.out) / "variants" / variant.name
    try:
        cfg = variant_config(args, sweep, variant)
        row.update(steps=cfg.steps, batch=global_batch(cfg, sweep.ranks))
        row.update(train_variant(cfg, sweep.ranks, pick_device(args.device), out_dir, deadline, args.export))
    except Deadline as err:
        row.update(status="timeout", error=str(err))
    except Exception as err:  # noqa: BLE001  (recorded; the sweep goes on)
        row.update(status="error", error=f"{type(err).__name__}: {err}",
                   traceback=traceback.format_exc(limit=6))
    row.setdefault("seconds", round(time.perf_counter() - start, 2))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "result.json", row)
    return row


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def worker_command(args, name: str, threads: int, deadline: float) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--sweep", args.sweep,
               "--out", args.out, "--data", args.data, "--text-tokenizer", args.text_tokenizer,
               "--device", args.device, "--threads", str(threads), "--deadline", repr(deadline)]
    if args.steps:
        command += ["--steps", str(args.steps)]
    if args.eval_images:
        command += ["--eval-images", str(args.eval_images)]
    if args.no_tf32:
        command.append("--no-tf32")
    if args.export:
        command.append("--export")
    return command


def run_parallel(args, sweep: SweepConfig, variants: list[Variant], results: Results, jobs: int,
                 threads: int, deadline: float) -> None:
    """Up to ``jobs`` variants at once, each a subprocess of this script; longest first."""
    cost = {v.name: steps_cost(args, sweep, v) for v in variants}
    pending = sorted(variants, key=lambda v: -cost[v.name])  # stable: YAML order among equals
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    done, total = 0, len(variants)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    try:
        while pending or running:
            while pending and len(running) < jobs and not (deadline and time.time() > deadline):
                variant = pending.pop(0)
                log_dir = Path(args.out) / "variants" / variant.name
                log_dir.mkdir(parents=True, exist_ok=True)
                (log_dir / "result.json").unlink(missing_ok=True)
                log = open(log_dir / "worker.log", "w", encoding="utf-8")
                proc = subprocess.Popen(worker_command(args, variant.name, threads, deadline), cwd=ROOT, env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
                running[variant.name] = (proc, time.perf_counter(), log)
            if deadline and time.time() > deadline and pending:
                for variant in pending:  # never started
                    done += 1
                    row = {"variant": variant.name, "overrides": variant.overrides, "status": "timeout",
                           "error": "not started before --time-limit", "seconds": 0}
                    results.add(row)
                    print(summary_line(row, done, total), flush=True)
                pending = []
            time.sleep(0.5)
            for name, (proc, started, log) in list(running.items()):
                if proc.poll() is None:
                    if deadline and time.time() > deadline + 60:  # the worker's own check failed to stop it
                        proc.kill()
                        proc.wait()
                    else:
                        continue
                log.close()
                del running[name]
                done += 1
                results.add(collect_worker(args, sweep, name, proc.returncode, time.perf_counter() - started))
                print(summary_line(results.rows[-1], done, total), flush=True)
    finally:
        for proc, _, log in running.values():  # only on an error/interrupt of the driver itself
            proc.kill()
            proc.wait()
            log.close()


def collect_worker(args, sweep: SweepConfig, name: str, returncode: int, seconds: float) -> dict:
    out_dir = Path(args.out) / "variants" / name
    result = out_dir / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    variant = next(v for v in sweep.variants if v.name == name)
    log_tail = ""
    if (out_dir / "worker.log").is_file():
        log_tail = " | ".join((out_dir / "worker.log").read_text(errors="replace").strip().splitlines()[-3:])
    return {"variant": name, "overrides": variant.overrides, "status": "error",
            "error": f"worker exited {returncode} without a result: {log_tail}"[:1000], "seconds": round(seconds, 2)}


def steps_cost(args, sweep: SweepConfig, variant: Variant) -> float:
    try:
        cfg = variant_config(args, sweep, variant)
        return cfg.steps * global_batch(cfg, sweep.ranks)
    except UserError:
        return 0.0  # fails fast in its worker, recorded there


def configure_torch(args, threads: int) -> None:
    torch.set_num_threads(max(1, threads))
    if torch.cuda.is_available() and args.device != "cpu" and not args.no_tf32:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (CUDA only)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench/tokenizer_sweep.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=DEFAULT_SWEEP, help=f"sweep YAML (default {DEFAULT_SWEEP})")
    parser.add_argument("--out", default="runs/tokenizer_sweep", help="output directory (default runs/tokenizer_sweep)")
    parser.add_argument("--data", default="runs/sweep_data/shapesworld",
                        help="ShapesWorld directory; generated when missing (default runs/sweep_data/shapesworld)")
    parser.add_argument("--text-tokenizer", default="runs/sweep_data/text_tokenizer.model",
                        help="sentencepiece model; trained on --data when missing "
                             "(default runs/sweep_data/text_tokenizer.model)")
    parser.add_argument("--data-overrides", nargs="*", default=[], metavar="key=value",
                        help=f"overrides for {DATA_CONFIG} when generating the data, e.g. splits.train=2000")
    parser.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--steps", type=int, default=0, help="force this many steps on every variant (smoke runs)")
    parser.add_argument("--eval-images", type=int, default=0, help="val images to evaluate (default: the config's)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="variants run at once, as subprocesses (default 1: in this process)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per variant (default: all cores with --jobs 1, else "
                             "cores / (2 x jobs): each job also runs a data thread)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="default: cuda when available")
    parser.add_argument("--no-tf32", action="store_true", help="strict fp32 matmuls on CUDA (default: TF32)")
    parser.add_argument("--time-limit", type=float, default=0, metavar="S",
                        help="stop training variants still running S seconds after the start (0: no limit)")
    parser.add_argument("--export", action="store_true",
                        help="also save each variant's tokenizer (variants/<name>/export)")
    parser.add_argument("--append", action="store_true", help="keep the rows of an earlier sweep.jsonl in --out")
    parser.add_argument("--list", action="store_true", help="print the variants and their overrides, then exit")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: run one variant (--jobs > 1)
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)  # internal: absolute time
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out, args.data, args.text_tokenizer = (str(Path(p).resolve())
                                                for p in (args.out, args.data, args.text_tokenizer))
    args.sweep = str(repo_path(args.sweep).resolve())
    sweep = load_config(SweepConfig, repo_path(args.sweep))
    by_name = {v.name: v for v in sweep.variants}
    if args.jobs < 1 or args.steps < 0 or args.eval_images < 0 or args.threads < 0:
        raise UserError("--jobs must be >= 1 and --steps, --eval-images, --threads >= 0")

    if args.worker:  # one variant inside a --jobs subprocess
        if args.worker not in by_name:
            raise UserError(f"unknown variant {args.worker!r}")
        configure_torch(args, args.threads or 1)
        row = run_variant(args, sweep, by_name[args.worker], args.deadline)
        if "traceback" in row:
            print(row["traceback"], file=sys.stderr)
        return 0

    wanted = [n for n in args.only.split(",") if n]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise UserError(f"--only: unknown variant(s) {unknown}; known: {', '.join(by_name)}")
    variants = [v for v in sweep.variants if not wanted or v.name in wanted]
    problems = {}
    for v in variants:  # a typo in the sweep file shows here, before any data is built
        try:
            variant_config(args, sweep, v)
        except UserError as err:
            problems[v.name] = str(err)
    if args.list:
        for v in variants:
            print(f"{v.name:<26} {' '.join(v.overrides) or '(none)'}" + (f"   # {v.note}" if v.note else "")
                  + (f"\n{'':<26} INVALID: {problems[v.name]}" if v.name in problems else ""))
        return 2 if problems else 0
    for name, problem in problems.items():  # recorded as failed rows; the others still run
        print(f"warning: variant {name}: {problem}", file=sys.stderr)

    start = time.time()
    deadline = start + args.time_limit if args.time_limit else 0.0
    device = pick_device(args.device)
    jobs = min(args.jobs, len(variants))
    cores = os.cpu_count() or 1
    threads = args.threads or (cores if jobs == 1 else max(1, cores // (2 * jobs)))  # jobs also run a data thread
    configure_torch(args, threads)
    ensure_data(Path(args.data), Path(args.text_tokenizer), args.data_overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    header = {"base": sweep.base, "data": args.data, "device": f"{device}{gpu}"}
    results = Results(out, header, args.append)
    print(f"sweep: {len(variants)} variant(s) on {device}{gpu}, {jobs} at a time, {threads} CPU thread(s) each; "
          f"results in {out}", flush=True)
    if jobs > 1:
        run_parallel(args, sweep, variants, results, jobs, threads, deadline)
    else:
        for i, variant in enumerate(variants, 1):
            if deadline and time.time() > deadline:
                row = {"variant": variant.name, "overrides": variant.overrides, "status": "timeout",
                       "error": "not started before --time-limit", "seconds": 0}
            else:
                row = run_variant(args, sweep, variant, deadline)
                if "traceback" in row:
                    print(row["traceback"], file=sys.stderr)
            results.add(row)
            print(summary_line(results.rows[-1], i, len(variants)), flush=True)
    failed = sum(r["status"] != "ok" for r in results.rows[-len(variants):])
    print(f"sweep done in {time.time() - start:.0f} s: {len(variants) - failed} ok, {failed} not; "
          f"table {results.md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
