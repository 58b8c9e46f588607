"""Results of ``bench/tokenizer_sweep.py``: ``sweep.jsonl`` (a row per variant, appended as it
finishes), ``sweep.md`` (the sorted table, rewritten after every row) and the one-line console summary.

Variants named ``<name>_s<seed>`` are repeats of one setting with different seeds: the table then
gets a second section with one line per setting (each seed's zero-shot accuracy, their mean, and
the mean paired difference to the setting named ``base`` or ``baseline`` over the seeds both ran),
since single runs of this tokenizer differ by up to ~18 points between seeds. To rebuild the table
from one or more finished sweeps::

    python bench/sweep_report.py A/sweep.jsonl B/sweep.jsonl --out table.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.json_fields import iter_jsonl  # noqa: E402
from mmcore.errors import UserError, cli_entry  # noqa: E402
from mmcore.io import atomic_write_text  # noqa: E402

SEEDED = re.compile(r"^(?P<setting>.+)_s(?P<seed>\d+)$")
BASE_SETTINGS = ("base", "baseline")

def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def cell(text: str, limit: int = 160) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).replace("|", "/").split())[:limit]


def markdown(rows: list[dict], header: dict) -> str:
    latest = {row["variant"]: row for row in rows}  # a rerun of a variant replaces its row
    ordered = sorted(latest.values(), key=lambda r: (r.get("zero_shot_acc") is None, -(r.get("zero_shot_acc") or 0)))
    base = latest.get("baseline", {}).get("zero_shot_acc")
    lines = ["# Tokenizer stage-1 sweep", "",
             f"Base `{header['base']}`, data `{header['data']}`, device {header['device']}, seed from the base "
             f"config unless a variant sets one, sorted by zero-shot colour+shape accuracy. Made by `bench/tokenizer_sweep.py` "
             f"(plain PyTorch, no DeepSpeed); per-variant logs in `variants/<name>/`.", "",
             "| variant | zero-shot | Δ vs baseline | PSNR dB | judge on recon | code entropy | steps × batch "
             "| final align / recon | s (train) | overrides |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ordered:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | **{r['status']}** | | | | | {r.get('steps', '')} × {r.get('batch', '')} "
                         f"| | {fmt(r.get('seconds'), '.0f')} "
                         f"| `{' '.join(r['overrides'])}` — {cell(r.get('error', ''))} |")
            continue
        zs, final = r.get("zero_shot_acc"), r.get("final_train", {})
        delta = "" if base is None or zs is None or r["variant"] == "baseline" else f"{100 * (zs - base):+.1f}"
        lines.append(
            f"| {r['variant']} | {fmt(zs, '.1f', 100)}% | {delta} | {fmt(r.get('psnr_db'), '.2f')} "
            f"| {fmt(r.get('judge_recon_acc'), '.1f', 100)}% | {fmt(r.get('code_entropy_fraction'), '.2f')} "
            f"| {r['steps']} × {r['batch']} | {fmt(final.get('align'), '.3f')} / {fmt(final.get('recon'), '.4f')} "
            f"| {fmt(r.get('seconds'), '.0f')} ({fmt(r.get('train_seconds'), '.0f')}) | `{' '.join(r['overrides'])}` |")
    lines += ["", "zero-shot: single-object val images classified among all colour x shape prompts; code entropy: "
              "fraction of the bits' maximum. Final align / recon: mean training losses over the last "
              "`log_every` steps."]
    lines += seed_section(list(latest.values()))
    return "\n".join(lines) + "\n"


def seed_groups(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """{setting: {seed: row}} of the finished rows whose variant is named ``<setting>_s<seed>``."""
    groups: dict[str, dict[int, dict]] = {}
    for row in rows:
        match = SEEDED.match(row["variant"])
        if match and row["status"] == "ok" and row.get("zero_shot_acc") is not None:
            groups.setdefault(match["setting"], {})[int(match["seed"])] = row
    return groups


def seed_section(rows: list[dict]) -> list[str]:
    """Markdown lines of the per-setting table (none unless some setting ran with >= 2 seeds)."""
    groups = seed_groups(rows)
    if not any(len(seeds) >= 2 for seeds in groups.values()):
        return []
    base = next((groups[name] for name in BASE_SETTINGS if name in groups), {})
    lines = ["", "## Per setting, over seeds", "",
             "Paired Δ: the mean of (setting − base) zero-shot over the seeds both ran (their count in brackets).", "",
             "| setting | seeds | zero-shot per seed | mean | paired Δ vs base | PSNR dB (mean) | judge (mean) |",
             "|---|---|---|---|---|---|---|"]
    def mean_of(seeds: dict[int, dict], key: str) -> float | None:
        values = [row[key] for row in seeds.values() if row.get(key) is not None]
        return statistics.mean(values) if values else None
    for setting, seeds in sorted(groups.items(), key=lambda item: -mean_of(item[1], "zero_shot_acc")):
        per_seed = ", ".join(f"s{seed} {fmt(row['zero_shot_acc'], '.1f', 100)}%" for seed, row in sorted(seeds.items()))
        paired = [row["zero_shot_acc"] - base[seed]["zero_shot_acc"] for seed, row in seeds.items() if seed in base]
        delta = "" if seeds is base or not paired else f"{100 * statistics.mean(paired):+.1f} ({len(paired)})"
        lines.append(f"| {setting} | {len(seeds)} | {per_seed} | {fmt(mean_of(seeds, 'zero_shot_acc'), '.1f', 100)}% "
                     f"| {delta} | {fmt(mean_of(seeds, 'psnr_db'), '.2f')} "
                     f"| {fmt(mean_of(seeds, 'judge_recon_acc'), '.1f', 100)}% |")
    return lines


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``sweep.jsonl``; a missing file, a line that is not JSON or not a sweep row
    (an object with ``variant``, ``status`` and ``overrides``) is a UserError naming file and line."""
    rows = []
    for number, row in iter_jsonl(path, "sweep results"):
        if not (isinstance(row, dict) and isinstance(row.get("variant"), str)
                and isinstance(row.get("status"), str) and isinstance(row.get("overrides"), list)):
            raise UserError(f"{path}:{number}: not a sweep row (needs variant, status and overrides)")
        rows.append(row)
    return rows


class Results:
    """sweep.jsonl (append per row) + sweep.md (rewritten per row)."""

    def __init__(self, out: Path, header: dict, append: bool):
        self.jsonl, self.md, self.header = out / "sweep.jsonl", out / "sweep.md", header
        self.rows: list[dict] = []
        if append and self.jsonl.is_file():
            self.rows = read_rows(self.jsonl)
        else:
            atomic_write_text(self.jsonl, "")

    def add(self, row: dict) -> None:
        first = ("variant", "status", "overrides", "steps", "batch", "seconds", "zero_shot_acc", "psnr_db",
                 "judge_recon_acc", "code_entropy_fraction", "final_train")
        row = {**{k: row[k] for k in first if k in row},
               **{k: v for k, v in sorted(row.items()) if k not in first and k != "traceback"}}
        self.rows.append(row)
        with open(self.jsonl, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        atomic_write_text(self.md, markdown(self.rows, self.header))


def summary_line(row: dict, done: int, total: int) -> str:
    head = f"[{done}/{total}] {row['variant']:<24}"
    if row["status"] != "ok":
        return f"{head} {row['status'].upper()}: {row.get('error', '')[:200]} ({row.get('seconds', 0):.0f} s)"
    return (f"{head} zero-shot {fmt(row.get('zero_shot_acc'), '5.1f', 100)}%  "
            f"PSNR {fmt(row.get('psnr_db'), '.2f')} dB  judge {fmt(row.get('judge_recon_acc'), '5.1f', 100)}%  "
            f"codes {fmt(row.get('code_entropy_fraction'), '.2f')}  "
            f"{row['steps']} x {row['batch']}  {row['seconds']:.0f} s (train {row['train_seconds']:.0f}, "
            f"{row['step_ms']:.0f} ms/step)")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild a sweep's Markdown table from sweep.jsonl files.")
    parser.add_argument("jsonl", nargs="+", type=Path, help="sweep.jsonl files (later rows of a variant win)")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--base", default="configs/tokenizer/tiny_stage1.yaml", help="base config named in the header")
    parser.add_argument("--data", default="ShapesWorld", help="data named in the header")
    parser.add_argument("--device", default="", help="device named in the header")
    args = parser.parse_args(argv)
    rows = [row for path in args.jsonl for row in read_rows(path)]  # all read before anything is written
    device = args.device or ", ".join(sorted({str(row.get("device", "?")) for row in rows}))
    atomic_write_text(args.out, markdown(rows, {"base": args.base, "data": args.data, "device": device}))
    print(f"wrote {args.out}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
