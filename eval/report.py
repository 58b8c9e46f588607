"""The human half of an evaluation: image grids (PNG) and ``report.md`` rendered from results.json.

Each task's entry in results.json carries what the report shows: ``table`` (its rows of the score
table: ``[metric, value, unit]``), ``tables`` (detail tables: ``{"title", "header", "rows"}``) and
``figures`` (``{"title", "file", "caption"}``, files relative to the output directory). The report
is a pure function of results.json (:func:`render_report`), so it can be rebuilt from it.

Grids frame each tile with the judge's verdict: green = accepted, red = rejected, white = not
judged; tiles are enlarged with nearest-neighbour so 32-pixel images stay legible.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from mmcore.io import atomic_write_bytes, atomic_write_text
from mmcore.machine import describe_text

FRAME = {True: (40, 170, 60), False: (215, 40, 40), None: (255, 255, 255)}
BACKGROUND = (255, 255, 255)


def grid_png(rows: Sequence[Sequence[np.ndarray | None]], verdicts: Sequence[Sequence[bool | None]] | None = None,
             scale: int = 3, frame: int = 3, gap: int = 4) -> bytes:
    """PNG bytes of a grid of uint8 (H, W, 3) tiles (None = empty cell), each framed by its verdict."""
    tiles = [t for row in rows for t in row if t is not None]
    if not tiles:
        raise ValueError("a grid needs at least one image")
    height, width = tiles[0].shape[0] * scale, tiles[0].shape[1] * scale
    cell_h, cell_w = height + 2 * frame, width + 2 * frame
    cols = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (cell_h + gap) + gap, cols * (cell_w + gap) + gap, 3), BACKGROUND, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile is None:
                continue
            verdict = verdicts[r][c] if verdicts is not None else None
            top, left = gap + r * (cell_h + gap), gap + c * (cell_w + gap)
            canvas[top:top + cell_h, left:left + cell_w] = FRAME[verdict]
            big = np.asarray(tile, np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
            canvas[top + frame:top + frame + height, left + frame:left + frame + width] = big[:height, :width]
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(out: Path, name: str, rows, verdicts=None) -> str:
    """Write ``figures/{name}`` under ``out`` atomically; returns its path relative to ``out``."""
    relative = f"figures/{name}"
    atomic_write_bytes(out / relative, grid_png(rows, verdicts))
    return relative


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def format_value(value, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, int) and unit == "":
        return str(value)
    if isinstance(value, str):
        return value
    if not math.isfinite(value):
        return "inf" if value > 0 else str(value)
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "dB":
        return f"{value:.2f} dB"
    return f"{value:.3f}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def render_report(results: dict) -> str:
    model, tasks = results.get("model") or {}, results["tasks"]
    lines = ["# Evaluation report", ""]
    facts = [("split", results["config"].get("split")), ("model", model.get("dir")),
             ("model hash", model.get("hash")), ("bundled tokenizer hash", model.get("tokenizer_hash")),
             ("--tokenizer", (results.get("tokenizer") or {}).get("dir")),
             ("--tokenizer hash", (results.get("tokenizer") or {}).get("hash")),
             ("seed", results["seeds"]["seed"]), ("finished", results.get("finished")),
             ("wall time", f"{results['timings']['total_s']:.1f} s")]
    lines += [f"- **{k}**: `{v}`" for k, v in facts if v is not None] + ["", "## Scores", ""]
    rows = [(name, metric, format_value(value, unit)) for name, task in tasks.items()
            for metric, value, unit in task["table"]]
    lines += [md_table(("task", "metric", "value"), rows), ""]
    for name, task in tasks.items():
        lines += [f"## {name}", "", task.get("description", ""), "",
                  f"Time: {results['timings'].get(name, 0):.1f} s.", ""]
        for table in task.get("tables", []):
            lines += [f"**{table['title']}**", "", md_table(table["header"], table["rows"]), ""]
        for figure in task.get("figures", []):
            lines += [f"**{figure['title']}**", "", f"![{figure['title']}]({figure['file']})", "",
                      figure.get("caption", ""), ""]
    versions = results.get("versions", {})
    lines += ["## Environment", ""]
    if results.get("machine"):
        lines += [f"Machine: {describe_text(results['machine'])}.", ""]
    lines += [md_table(("package", "version"), sorted(versions.items())), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(out: Path, results: dict) -> Path:
    return atomic_write_text(out / "report.md", render_report(results))
