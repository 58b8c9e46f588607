"""`make ablation`: QLIP's loss-balance ablation (paper Table 3a) in miniature, on ShapesWorld.

Three stage-1 runs with one fixed budget (same preset, data, steps, batch, seed) that differ only
in the loss weights: alignment only, reconstruction only, and the balanced mix. The table
(zero-shot colour+shape accuracy and PSNR on the val split) is written to ``<out>/ablation.md``
and ``<out>/ablation.json``. The claim to check: balanced keeps zero-shot within 2 points of
align-only and PSNR within 1 dB of recon-only.

    python scripts/ablation.py [--out runs/ablation] [--data runs/demo/data] [key=value ...]

It needs the demo's data and text tokenizer (``make demo`` makes them); extra ``key=value``
arguments go to every run (e.g. ``steps=100`` for a quick look). The runs use a fixed step
count (``FIXED_BUDGET``, the demo config's wall-clock budget switched off): with a time budget
the arms' lengths would depend on the machine's speed while each ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train.distributed import find_free_port  # noqa: E402  (after making the repo importable)
FIXED_BUDGET = ["time_budget_s=0", "steps=900"]  # the demo's step count in a fast phase
RUNS = {  # name -> loss-weight overrides
    "align-only": ["weights.recon=0.0"],
    "recon-only": ["weights.align=0.0"],
    "balanced": [],
}


def run(name: str, out: Path, data: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(find_free_port()), "train/tokenizer.py",
               "--config", "configs/tokenizer/tiny_stage1.yaml", f"data.data={data}",
               f"data.text_tokenizer={data.parent / 'text_tokenizer.model'}",
               f"out_dir={out / name}", "resume=false", *FIXED_BUDGET, *RUNS[name], *extra]
    print(f"\n=== {name}\n$ {' '.join(command)}", flush=True)
    result = subprocess.run(command, cwd=ROOT, env=os.environ.copy())
    if result.returncode != 0:
        sys.exit(f"ablation: run {name!r} failed (exit {result.returncode})")
    return json.loads((out / name / "metrics.json").read_text())


def table(results: dict[str, dict]) -> str:
    rows = ["| run | loss weights (recon / align) | zero-shot colour+shape | PSNR (dB) | judge on recon |",
            "|---|---|---|---|---|"]
    for name, result in results.items():
        m, w = result["metrics"], result["loss_weights"]
        zero_shot = f"{m['zero_shot_acc']:.1%}" if w["align"] > 0 and "zero_shot_acc" in m else "n/a (no alignment)"
        psnr = f"{m['psnr_db']:.2f}" if w["recon"] > 0 else f"{m['psnr_db']:.2f} (decoder untrained)"
        rows.append(f"| {name} | {w['recon']:g} / {w['align']:g} | {zero_shot} | {psnr} | "
                    f"{m['judge_recon_acc']:.1%} |")
    return "\n".join(rows) + "\n"


def verdict(results: dict[str, dict]) -> str:
    balanced, align, recon = (results[k]["metrics"] for k in ("balanced", "align-only", "recon-only"))
    zs_gap = 100 * (align["zero_shot_acc"] - balanced["zero_shot_acc"])
    psnr_gap = recon["psnr_db"] - balanced["psnr_db"]
    ok = zs_gap <= 2 and psnr_gap <= 1
    return (f"zero-shot: balanced is {zs_gap:+.1f} points behind align-only (negative = ahead; claim: <= 2); "
            f"PSNR: balanced is {psnr_gap:+.2f} dB behind recon-only (negative = ahead; claim: <= 1) -> "
            f"claim {'holds' if ok else 'does NOT hold'} at this budget")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--data", default="runs/demo/data", help="ShapesWorld dir (text tokenizer next to it)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every run")
    args = parser.parse_args()
    data, out = (ROOT / args.data).resolve(), (ROOT / args.out).resolve()
    if not (data / "manifest.json").is_file() or not (data.parent / "text_tokenizer.model").is_file():
        print(f"error: {data} with a text_tokenizer.model beside it not found; run `make demo` first",
              file=sys.stderr)
        return 2
    results = {name: run(name, out, data, args.overrides) for name in RUNS}
    text = table(results) + "\n" + verdict(results) + "\n"
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + text + f"written to {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
