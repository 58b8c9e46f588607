"""Benchmark (not a test): ShapesWorld generation rate, analyser rate and analyser accuracy.

    python bench/bench_data.py [--n 2000] [--sizes 32 64]

Generation counts everything a shard writer does per sample except the tar write: scene sampling
with split dedupe, rendering, PNG encoding, captions/QA and JSON, in one process. The analyser
is timed on pre-rendered clean images, then scored on fresh renders (a seed no dataset uses):
clean, N(0, 0.05) noise, sigma 0.5 px blur, and both.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unified_mm.data.analyser import analyse, degrade, scene_matches  # noqa: E402
from unified_mm.data.shapesworld import (ShapesWorldConfig, SplitSizes, generate_split,  # noqa: E402
                                         meta_to_json_bytes, render, sample_scene)

CONDITIONS = {  # name -> (noise std in [0, 1] units, blur sigma in px)
    "clean": (0.0, 0.0), "noise .05": (0.05, 0.0), "blur .5": (0.0, 0.5), "noise+blur": (0.05, 0.5),
}


def generation_rate(image_size: int, count: int) -> float:
    """Samples per second through :func:`generate_split`, PNG and JSON bytes included."""
    cfg = ShapesWorldConfig(image_size=image_size, splits=SplitSizes(train=count, val=0, test=0))
    start = time.perf_counter()
    for _, png, meta in generate_split(cfg, "train"):
        meta_to_json_bytes(meta)
    return count / (time.perf_counter() - start)


def analyser_rate(cfg: ShapesWorldConfig, images: list) -> float:
    analyse(images[0], cfg)  # build the template cache outside the timing
    start = time.perf_counter()
    for image in images:
        analyse(image, cfg)
    return len(images) / (time.perf_counter() - start)


def analyser_accuracy(cfg: ShapesWorldConfig, scenes: list, images: list) -> dict[str, float]:
    """Fraction of images whose objects are all recovered exactly, per damage condition."""
    rng = np.random.default_rng(2024)
    scores = {}
    for name, (noise, blur) in CONDITIONS.items():
        hits = [scene_matches(analyse(degrade(image, noise, blur, rng), cfg), scene.objects)
                for scene, image in zip(scenes, images)]
        scores[name] = float(np.mean(hits))
    return scores


def run(image_size: int, count: int) -> dict[str, float]:
    cfg = ShapesWorldConfig(image_size=image_size)
    rng = random.Random(f"bench/{image_size}")
    scenes = [sample_scene(rng, cfg) for _ in range(count)]
    images = [render(scene, cfg) for scene in scenes]
    return {"generate/s": generation_rate(image_size, count), "analyse/s": analyser_rate(cfg, images),
            **analyser_accuracy(cfg, scenes, images)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="samples/images per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="image sizes")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    columns = ["size", "generate/s", "analyse/s", *CONDITIONS]
    print(f"ShapesWorld data benchmark, n={args.n} per row, single process")
    print("  ".join(f"{c:>11}" for c in columns))
    for size in args.sizes:
        row = run(size, args.n)
        cells = [f"{size:>11}", f"{row['generate/s']:>11.0f}", f"{row['analyse/s']:>11.0f}"]
        cells += [f"{row[name]:>11.2%}" for name in CONDITIONS]
        print("  ".join(cells))
    print("accuracy columns: fraction of images with every object's colour, shape, size and cell right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
