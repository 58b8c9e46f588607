"""`make ablation`: QLIP's loss-balance ablation (paper Table 3a) in miniature, on ShapesWorld.

Three stage-1 arms with one fixed budget (same preset, data, steps, batch) that differ only in the
loss weights: alignment only, reconstruction only, and the balanced mix of
``configs/tokenizer/tiny_stage1.yaml``. Each arm runs once per seed (default 0, 1, 2): a single
run of this tokenizer moves by up to ~18 points of zero-shot accuracy between seeds
(docs/measurements/sweep_zs_gpu.md), more than the claim's 2-point margin, so the verdict is on
the arms' means over the seeds, with the per-seed (paired) gaps beside it. The table (zero-shot
colour+shape accuracy, PSNR and judge accuracy on the val split) is written to
``<out>/ablation.md`` and ``<out>/ablation.json``. The claim to check: balanced keeps zero-shot
within 2 points of align-only and PSNR within 1 dB of recon-only.

    python scripts/ablation.py [--out runs/ablation] [--data DIR] [--seeds 0,1,2] [key=value ...]

Its data is 32 px ShapesWorld (``configs/data/shapesworld.yaml``, the geometry of
``tiny_stage1.yaml`` and of the committed results; the demo has moved to 36 px cells), made with a
text tokenizer under ``<out>/data`` on first use (~15 s) unless ``--data`` names a ShapesWorld dir
with a ``text_tokenizer.model`` beside it; extra ``key=value``
arguments go to every run (e.g. ``steps=100`` for a quick look). The runs use a fixed step
count (``FIXED_BUDGET``, the demo config's wall-clock budget switched off): with a time budget
the arms' lengths would depend on the machine's speed while each ran. A run whose
``metrics.json`` exists from the same command is reused, so a stopped ablation resumes where it
stopped: reused when the stage-1 YAML and the overrides are unchanged (``--fresh`` reruns
everything, e.g. after a code change).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmcore.errors import UserError, cli_entry  # noqa: E402  (after making the repo importable)
from mmcore.io import atomic_write_text  # noqa: E402
from train.distributed import torchrun_command  # noqa: E402

# Demo 20's stage-1 budget: 1,398 steps of global batch 64 in its 330 s. The demo has since moved
# to global batch 32 (~2,350 steps in the same time) and to Muon under ZeRO stage 0 (session 16);
# the ablation stays at 1,400 x 64 with AdamW under ZeRO-2, so that its committed results
# (docs/measurements/ablation_3seeds_1400x64.md) are what this command makes.
FIXED_BUDGET = ["time_budget_s=0", "steps=1400", "engine.micro_batch_size=32", "optim.name=adamw",
                "optim.muon_params=[]", "engine.deepspeed_config=configs/deepspeed/zero2.json"]
ARMS = {  # name -> loss-weight overrides
    "align-only": ["weights.recon=0.0"],
    "recon-only": ["weights.align=0.0"],
    "balanced": [],
}
BASE_CONFIG = "configs/tokenizer/tiny_stage1.yaml"
DATA_CONFIG = "configs/data/shapesworld.yaml"  # 32 px, the image size BASE_CONFIG's preset reads
COMMAND_FILE = "ablation_command.json"  # what a finished run was made with: the YAML's hash + overrides


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


def run_overrides(arm: str, seed: int, out_dir: Path, data: Path, extra: list[str]) -> list[str]:
    return [f"data.data={data}", f"data.text_tokenizer={data.parent / 'text_tokenizer.model'}",
            f"out_dir={out_dir}", "resume=false", *FIXED_BUDGET, f"seed={seed}", *ARMS[arm], *extra]


def run_record(overrides: list[str], base_config: Path = ROOT / BASE_CONFIG) -> dict:
    """What identifies a run: the stage-1 YAML's content and the overrides on it."""
    return {"config_sha256": hashlib.sha256(base_config.read_bytes()).hexdigest(), "overrides": overrides}


def finished(out_dir: Path, record: dict) -> dict | None:
    """The metrics of a run already made from exactly this record (:func:`run_record`), else None."""
    metrics, command = out_dir / "metrics.json", out_dir / COMMAND_FILE
    if not (metrics.is_file() and command.is_file()):
        return None
    try:
        if json.loads(command.read_text()) != record:
            return None
        return json.loads(metrics.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run(arm: str, seed: int, out: Path, data: Path, extra: list[str], fresh: bool) -> dict:
    out_dir = out / f"{arm}_s{seed}"
    overrides = run_overrides(arm, seed, out_dir, data, extra)
    record = run_record(overrides)
    if not fresh and (done := finished(out_dir, record)) is not None:
        print(f"\n=== {arm}, seed {seed}: reusing {out_dir / 'metrics.json'}", flush=True)
        return done
    command = torchrun_command("train/tokenizer.py", "--config", BASE_CONFIG, *overrides)
    print(f"\n=== {arm}, seed {seed}\n$ {' '.join(command)}", flush=True)
    (out_dir / COMMAND_FILE).unlink(missing_ok=True)
    result = subprocess.run(command, cwd=ROOT, env=os.environ.copy())
    if result.returncode != 0:
        raise UserError(f"ablation: run {arm!r} seed {seed} failed (exit {result.returncode}); "
                        f"its log is above, its directory {out_dir}")
    atomic_write_text(out_dir / COMMAND_FILE, json.dumps(record) + "\n")
    return json.loads((out_dir / "metrics.json").read_text())


def _per_seed(values: list[float], spec: str, scale: float = 1.0) -> str:
    return ", ".join(format(v * scale, spec) for v in values)


def table(results: dict[str, dict[int, dict]]) -> str:
    """One row per arm: the mean over its seeds, each seed's value in brackets."""
    rows = ["| run | loss weights (recon / align) | seeds | zero-shot colour+shape | PSNR (dB) | judge on recon |",
            "|---|---|---|---|---|---|"]
    for arm, by_seed in results.items():
        runs = list(by_seed.values())
        weights = runs[0]["loss_weights"]
        zero_shot = [r["metrics"]["zero_shot_acc"] for r in runs if "zero_shot_acc" in r["metrics"]]
        psnr = [r["metrics"]["psnr_db"] for r in runs]
        judge = [r["metrics"]["judge_recon_acc"] for r in runs]
        zs_text = (f"{statistics.fmean(zero_shot):.1%} ({_per_seed(zero_shot, '.1f', 100)})"
                   if weights["align"] > 0 and zero_shot else "n/a (no alignment)")
        psnr_text = f"{statistics.fmean(psnr):.2f} ({_per_seed(psnr, '.2f')})"
        if weights["recon"] == 0:
            psnr_text += " (decoder untrained)"
        rows.append(f"| {arm} | {weights['recon']:g} / {weights['align']:g} | "
                    f"{', '.join(map(str, by_seed))} | {zs_text} | {psnr_text} | "
                    f"{statistics.fmean(judge):.1%} ({_per_seed(judge, '.1f', 100)}) |")
    return "\n".join(rows) + "\n"


def gaps(results: dict[str, dict[int, dict]]) -> tuple[dict[int, float], dict[int, float]]:
    """Per seed: zero-shot points balanced is behind align-only, PSNR dB behind recon-only."""
    balanced, align, recon = (results[k] for k in ("balanced", "align-only", "recon-only"))
    seeds = [s for s in balanced if s in align and s in recon]
    zs = {s: 100 * (align[s]["metrics"]["zero_shot_acc"] - balanced[s]["metrics"]["zero_shot_acc"])
          for s in seeds}
    psnr = {s: recon[s]["metrics"]["psnr_db"] - balanced[s]["metrics"]["psnr_db"] for s in seeds}
    return zs, psnr


def verdict(results: dict[str, dict[int, dict]]) -> str:
    zs, psnr = gaps(results)
    zs_gap, psnr_gap = statistics.fmean(list(zs.values())), statistics.fmean(list(psnr.values()))
    ok = zs_gap <= 2 and psnr_gap <= 1
    per_seed = "; ".join(f"seed {s}: {zs[s]:+.1f} points, {psnr[s]:+.2f} dB" for s in zs)
    return (f"zero-shot: balanced is {zs_gap:+.1f} points behind align-only on average (negative = "
            f"ahead; claim: <= 2); PSNR: balanced is {psnr_gap:+.2f} dB behind recon-only (claim: <= 1) "
            f"-> claim {'holds' if ok else 'does NOT hold'} at this budget, over {len(zs)} seed(s) "
            f"({per_seed})")


def run_tool(command: list[str]) -> None:
    """One of the project's CLIs (its own output shows); a failure is a UserError naming it."""
    result = subprocess.run(command, cwd=ROOT)
    if result.returncode != 0:
        raise UserError(f"making the ablation's data failed (exit {result.returncode}): {' '.join(command)}")


def ensure_data(data: Path | None, out: Path) -> Path:
    """The ShapesWorld dir the arms train on: ``data`` as given (checked), else ``<out>/data``,
    generated with its text tokenizer beside it when missing."""
    if data is None:
        data = out / "data"
        if not (data / "manifest.json").is_file():
            run_tool([sys.executable, "-m", "unified_mm.data.shapesworld_cli", "--config", DATA_CONFIG,
                      "--out", str(data), "--overwrite"])
        if not (out / "text_tokenizer.model").is_file():
            run_tool([sys.executable, "-m", "train.text_tokenizer", "--config", "configs/text_tokenizer.yaml",
                      f"data={data}", f"out={out / 'text_tokenizer.model'}"])
    if not (data / "manifest.json").is_file() or not (data.parent / "text_tokenizer.model").is_file():
        raise UserError(f"--data {data}: no ShapesWorld manifest.json in it, or no text_tokenizer.model beside it")
    size = json.loads((data / "manifest.json").read_text()).get("image_size")
    if size is not None and size != 32:
        raise UserError(f"--data {data}: {size} px images, but {BASE_CONFIG} reads 32 px ones "
                        f"(leave --data out to make 32 px data under --out)")
    return data


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--data", default=None, help="32 px ShapesWorld dir with text_tokenizer.model beside it "
                        "(default: <out>/data, generated on first use)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every arm runs each")
    parser.add_argument("--fresh", action="store_true", help="rerun finished runs instead of reusing them")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every run")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    out = (ROOT / args.out).resolve()
    data = ensure_data((ROOT / args.data).resolve() if args.data else None, out)
    results: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    for seed in seeds:  # seed-major: a stopped ablation leaves whole seeds behind
        for arm in ARMS:
            results[arm][seed] = run(arm, seed, out, data, args.overrides, args.fresh)
    text = table(results) + "\n" + verdict(results) + "\n"
    atomic_write_text(out / "ablation.md", text)
    atomic_write_text(out / "ablation.json", json.dumps(
        {arm: {str(s): r for s, r in by_seed.items()} for arm, by_seed in results.items()}, indent=2) + "\n")
    print("\n" + text + f"written to {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
