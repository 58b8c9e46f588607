"""Text-to-image sampling from an exported unified model: PNGs, a grid and a JSONL record per image.

    python -m unified_mm.sample_cli --model EXPORT --prompt "a red circle" --prompt "a blue square" \\
        --n 4 --out samples/
    python -m unified_mm.sample_cli --model EXPORT --prompts prompts.txt --n 2 --cfg-scale 4 --seed 7 --out s/

``--prompts FILE``: one prompt per line (blank lines skipped), or JSON lines with a ``"prompt"``
field (a line starting with ``{`` is read as JSON). Sampler settings default to the ones stored with
the export (``unified_mm.json``: ``sampler_defaults``); each flag overrides one.

The output directory holds ``PPP-SS.png`` per image (prompt index, sample index), ``grid.png``
(one row per prompt) and ``samples.jsonl`` (one record per image: file, prompt, seed, sampler
settings, checkpoint and tokenizer hashes). Image ``i`` uses seed ``--seed + i``; any image is
redrawn alone with ``--prompt P --n 1 --seed S``. Everything is checked before sampling, and the
directory appears whole or not at all (an existing non-empty one needs ``--overwrite``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from mmcore.errors import UserError, cli_entry
from mmcore.io import atomic_output_dir
from tokenizer.images import decode_to_pixels, pixels_to_uint8, png_bytes
from unified_mm.export import load_qlip, load_unified
from unified_mm.sampling import SampledImage, SamplerSettings, sample_images
from unified_mm.sequence import SequenceBuilder


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line :class:`UserError` s like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """Overrides of the export's sampler defaults (None = keep the default)."""
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--temperature", type=float, help="0 = argmax")
    parser.add_argument("--top-k", type=int, help="keep the k most likely ids per group (0 = off)")
    parser.add_argument("--top-p", type=float, help="nucleus mass to keep, in (0, 1]")
    parser.add_argument("--seed", type=int, help="seed of the first image (image i uses seed + i)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def check_device(device: str) -> None:
    try:
        torch.empty(0, device=device)  # an unknown or unavailable device fails here, clearly
    except (RuntimeError, ValueError, AssertionError) as err:
        raise UserError(f"--device {device}: {err}") from None


def settings_from_args(defaults: dict, args: argparse.Namespace) -> SamplerSettings:
    return SamplerSettings.from_defaults(defaults, temperature=args.temperature, top_k=args.top_k,
                                         top_p=args.top_p, cfg_scale=args.cfg_scale, seed=args.seed)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="python -m unified_mm.sample_cli", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="unified model export directory")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="file: one prompt per line, or JSONL with a 'prompt' field")
    parser.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward (default 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sampler_flags(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def _file_prompt(line: str, where: str) -> str:
    if not line.startswith("{"):
        return line
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise UserError(f"{where}: a JSON line needs a string field 'prompt'")
    return record["prompt"]


def read_prompts_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text: {err}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            prompt = _file_prompt(line.strip(), f"{path}:{number}")
            if not prompt.strip():
                raise UserError(f"{path}:{number}: empty prompt")
            prompts.append(prompt.strip())
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts


def collect_prompts(args: argparse.Namespace) -> list[str]:
    for i, prompt in enumerate(args.prompt):
        if not prompt.strip():
            raise UserError(f"--prompt #{i + 1} is empty; give a caption (unconditional samples: "
                            "sample_images with prompt '' from Python)")
    prompts = [p.strip() for p in args.prompt]
    if args.prompts:
        prompts += read_prompts_file(args.prompts)
    if not prompts:
        raise UserError("give at least one --prompt or a --prompts file")
    return prompts


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace it")


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def image_name(prompt_index: int, sample_index: int) -> str:
    return f"{prompt_index:03d}-{sample_index:02d}.png"


def grid_image(tiles: np.ndarray, rows: int, gap: int = 2) -> Image.Image:
    """tiles (rows·cols, H, W, 3) uint8 in row-major order → one image with white gaps."""
    count, height, width, _ = tiles.shape
    cols = count // rows
    canvas = np.full((rows * (height + gap) - gap, cols * (width + gap) - gap, 3), 255, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, cols)
        canvas[r * (height + gap): r * (height + gap) + height, c * (width + gap): c * (width + gap) + width] = tile
    return Image.fromarray(canvas)


def records(samples: list[SampledImage], n: int, settings: SamplerSettings, model_hash: str,
            tokenizer_hash: str) -> list[dict]:
    return [{"file": image_name(i // n, i % n), "prompt": s.prompt, "prompt_index": i // n, "sample_index": i % n,
             "seed": s.seed, "settings": {**settings.to_dict(), "seed": s.seed}, "checkpoint_hash": model_hash,
             "tokenizer_hash": tokenizer_hash} for i, s in enumerate(samples)]


def write_outputs(out: Path, pixels: torch.Tensor, rows: int, entries: list[dict]) -> None:
    """PNGs, grid and JSONL into a temporary sibling, renamed to ``out`` only when all are written."""
    with atomic_output_dir(out) as tmp:
        for image, entry in zip(pixels, entries):
            (tmp / entry["file"]).write_bytes(png_bytes(image))
        tiles = np.stack([pixels_to_uint8(image) for image in pixels])
        grid_image(tiles, rows).save(tmp / "grid.png")
        (tmp / "samples.jsonl").write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        raise UserError(f"--n and --batch-size must be >= 1, got {args.n} and {args.batch_size}")
    prompts = collect_prompts(args)
    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    check_device(args.device)
    loaded = load_unified(args.model, device=args.device)
    qlip = load_qlip(loaded, device=args.device)
    settings = settings_from_args(loaded.sampler_defaults, args)
    builder = SequenceBuilder(loaded.text_tokenizer, loaded.vocab,
                              max_length=int(loaded.model.config.max_position_embeddings))
    total = len(prompts) * args.n * loaded.vocab.tokens_per_image
    start = time.perf_counter()
    with tqdm(total=total, unit="tok", desc="sampling", disable=args.quiet) as bar:
        samples = sample_images(loaded.model, loaded.vocab, builder, prompts, args.n, settings,
                                batch_size=args.batch_size, progress=bar.update)
    rate = total / (time.perf_counter() - start)
    pixels = decode_to_pixels(qlip.model, torch.stack([s.image_codes for s in samples]))  # (B, 3, S, S)
    write_outputs(out, pixels, len(prompts), records(samples, args.n, settings, loaded.hash, loaded.tokenizer_hash))
    print(f"wrote {len(samples)} images ({len(prompts)} prompts x {args.n}), grid.png and samples.jsonl to "
          f"{out} ({rate:.0f} image tokens/s, cfg {settings.cfg_scale:g}, checkpoint {loaded.hash})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
