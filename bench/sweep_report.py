"""Results of ``bench/tokenizer_sweep.py``: ``sweep.jsonl`` (a row per variant, appended as it
finishes), ``sweep.md`` (the sorted table, rewritten after every row) and the one-line console summary."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mmcore.io import atomic_write_text

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
             f"config, sorted by zero-shot colour+shape accuracy. Made by `bench/tokenizer_sweep.py` "
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
    return "\n".join(lines) + "\n"


class Results:
    """sweep.jsonl (append per row) + sweep.md (rewritten per row)."""

    def __init__(self, out: Path, header: dict, append: bool):
        self.jsonl, self.md, self.header = out / "sweep.jsonl", out / "sweep.md", header
        self.rows: list[dict] = []
        if append and self.jsonl.is_file():
            self.rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
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
