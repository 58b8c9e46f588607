"""Tokenizer metrics on a ShapesWorld split: PSNR, zero-shot accuracy, code usage, judge on recon.

Shared by tokenizer training (its end-of-run evaluation) and the evaluation harness.

* ``psnr_db``: mean per-image PSNR of reconstructions (on [0, 1] pixels). Mostly background on
  ShapesWorld, so it flatters blurry models; read it beside ``judge_recon_acc``.
* ``judge_recon_acc``: fraction of reconstructions in which the pixel analyser recovers exactly the
  ground-truth objects: the ceiling for text-to-image through this tokenizer.
* ``zero_shot_acc``: single-object images classified among every colour x shape prompt
  (``"a red circle"``), i.e. colour+shape must both be right. ``templates`` gives a CLIP-style
  prompt ensemble instead (each class embedding is the mean over its prompts).
  ``zero_shot_colour_acc`` / ``zero_shot_shape_acc``: how often the predicted class has the right
  colour / the right shape (where the misses are).
* ``code_entropy_fraction``: empirical entropy of the hard codes over all evaluated tokens, summed
  over groups, divided by the number of bits (the maximum).
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from mmcore.config import load_config
from mmcore.text_tokenizer import TextTokenizer
from tokenizer.bsq import used_code_entropy_bits
from tokenizer.losses import psnr
from tokenizer.qlip import QLIP
from tokenizer.zero_shot import class_embeddings, zero_shot_classify
from unified_mm.data.analyser import analyse, scene_matches
from unified_mm.data.shapesworld import ShapesWorldConfig
from unified_mm.data.pixels import image_to_pixels, pixels_to_images
from unified_mm.data.shards import ShardDataset, resolve_shards


DEFAULT_TEMPLATES = ("a {colour} {shape}",)


def data_config(data_dir: str | Path) -> ShapesWorldConfig:
    """The generator config saved with a ShapesWorld dataset (defaults when absent)."""
    path = Path(data_dir) / "config.yaml"
    return load_config(ShapesWorldConfig, path) if path.is_file() else ShapesWorldConfig()


def colour_shape_classes(cfg: ShapesWorldConfig) -> list[tuple[str, str]]:
    return [(colour, shape) for colour in cfg.colours for shape in cfg.shapes]


@torch.no_grad()
def evaluate_tokenizer(model: QLIP, text_tokenizer: TextTokenizer | None, data_dir: str | Path,
                       split: str = "val", max_images: int = 1000, batch_size: int = 100,
                       progress: bool = True, templates: Sequence[str] = DEFAULT_TEMPLATES) -> dict:
    """Metrics of ``model`` on the first ``max_images`` images of a split (see module doc).
    ``templates``: zero-shot prompt templates with ``{colour}`` and ``{shape}`` fields."""
    model.eval()
    world = data_config(data_dir)
    # every sample on this process even inside a distributed run (rank 0 evaluates alone)
    samples = list(islice(ShardDataset(resolve_shards(data_dir, split), split_by_rank=False), max_images))
    classes = colour_shape_classes(world)
    class_embeds = None
    if model.text is not None and text_tokenizer is not None:
        prompts = [[t.format(colour=c, shape=s) for t in templates] for c, s in classes]
        class_embeds = class_embeddings(model, text_tokenizer, prompts)
    psnr_sum, group_indices, judged = 0.0, [], []
    zero_shot: list[tuple[bool, bool]] = []  # (colour right, shape right) per single-object image
    batches = range(0, len(samples), batch_size)
    for start in tqdm(batches, desc=f"eval tokenizer on {split}", disable=not progress, unit="batch"):
        chunk = samples[start: start + batch_size]
        pixels = torch.stack([image_to_pixels(s.image) for s in chunk])
        out = model(pixels)
        psnr_sum += float(psnr(out.reconstruction, pixels)) * len(chunk)
        group_indices.append(out.bsq.group_indices.reshape(-1, out.bsq.group_indices.shape[-1]))
        for image, sample in zip(pixels_to_images(out.reconstruction), chunk):
            judged.append(scene_matches(analyse(image, world), sample.meta.get("objects", [])))
        if class_embeds is not None:
            single = [i for i, s in enumerate(chunk) if len(s.meta.get("objects", [])) == 1]
            if single:
                predicted = zero_shot_classify(model, pixels[single], class_embeds).predictions
                for i, p in zip(single, predicted.tolist()):
                    obj = chunk[i].meta["objects"][0]
                    zero_shot.append((classes[p][0] == obj["colour"], classes[p][1] == obj["shape"]))
    codes = torch.cat(group_indices)
    entropy_bits = float(used_code_entropy_bits(codes, model.config.bsq.group_size).sum())
    metrics = {
        "split": split, "images": len(samples),
        "psnr_db": psnr_sum / max(1, len(samples)),
        "judge_recon_acc": float(np.mean(judged)),
        "code_entropy_bits": entropy_bits,
        "code_entropy_fraction": entropy_bits / model.config.bsq.num_bits,
        "distinct_codes": int(torch.unique(codes, dim=0).shape[0]),
    }
    if zero_shot:
        colour_right, shape_right = np.array(zero_shot).T
        metrics.update(zero_shot_acc=float(np.mean(colour_right & shape_right)), zero_shot_images=len(zero_shot),
                       zero_shot_classes=len(classes), zero_shot_colour_acc=float(np.mean(colour_right)),
                       zero_shot_shape_acc=float(np.mean(shape_right)))
    return metrics
