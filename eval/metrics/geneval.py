"""Compositional text-to-image accuracy on ShapesWorld, GenEval style (Ghosh et al. 2023).

GenEval checks generated images against a structured prompt (which objects, how many, which
colour, where) with an object detector. On ShapesWorld the judge is the model-free pixel analyser
(:mod:`unified_mm.data.analyser`), exact on clean renders, so the scores measure the generator
alone. Prompts use GenEval's JSONL record (:mod:`eval.formats`) with ShapesWorld attributes:
``class`` = shape, ``color`` = colour, ``count``, ``position`` = an absolute position name
("top left", "center", ...) and the extra ``size``.

Scoring one image against one prompt, with the prompt expanded into one requirement per object
(an item with ``count: 2`` asks for two objects):

* per attribute a in colour, shape, size, position (only where the prompt names a): the image has
  a *distinct* detected object with the asked value of a for every requirement (a one-to-one
  matching, :func:`unified_mm.data.analyser.satisfies`, ignoring the other attributes);
* count: the number of detected objects equals the number the prompt asks for (ShapesWorld
  prompts describe the whole scene);
* whole prompt: one matching pairs every requirement with its own detection on all named
  attributes at once, with no extra objects (``exact_count``), and every ``exclude`` item holds
  (fewer than ``count`` detections match it, GenEval's rule).

Accuracies are means over prompts (per attribute: over the prompts that name it), plus the whole-
prompt accuracy per tag.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import islice
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from mmcore.config import load_config
from mmcore.errors import UserError
from unified_mm.data.analyser import DetectedObject, analyse, satisfies
from unified_mm.data.shapesworld import (POSITION_NAMES, ShapesWorldConfig, render,
                                         scene_from_meta)

from eval.formats import GenEvalPrompt

CAPTION_KINDS = {"short": 0, "long": 1, "sentence": 2}   # index into a sample's captions
ATTRIBUTES = ("colour", "shape", "size", "position")
SCORE_NAMES = ("colour", "shape", "count", "position", "size")
ALL_POSITIONS = tuple(name for row in POSITION_NAMES for name in row)
_FIELD_TO_ATTRIBUTE = {"class": "shape", "color": "colour", "size": "size", "position": "position"}


# ---------------------------------------------------------------------------------------------
# Prompts from ShapesWorld samples
# ---------------------------------------------------------------------------------------------

def _include_items(objects: list[dict], kind: str) -> list[dict]:
    """GenEval ``include`` items describing ``objects`` at the detail of caption ``kind``."""
    if kind == "short":  # "a red circle and a blue square": colour + shape, grouped with counts
        counts: dict[tuple[str, str], int] = {}
        for obj in objects:
            counts[(obj["colour"], obj["shape"])] = counts.get((obj["colour"], obj["shape"]), 0) + 1
        return [{"class": shape, "count": n, "color": colour} for (colour, shape), n in counts.items()]
    return [{"class": o["shape"], "count": 1, "color": o["colour"], "size": o["size"],
             "position": o["position"]} for o in objects]  # long / sentence name everything


def prompt_from_meta(meta: dict, kind: str = "short") -> GenEvalPrompt:
    """The GenEval record for one ShapesWorld sample's caption of ``kind`` (short, long or
    sentence; see :func:`unified_mm.data.shapesworld.captions_for`)."""
    if kind not in CAPTION_KINDS:
        raise UserError(f"unknown caption kind {kind!r}; expected one of {', '.join(CAPTION_KINDS)}")
    key = meta.get("key")
    objects, captions = meta.get("objects"), meta.get("captions")
    if not isinstance(objects, list) or not objects:
        raise UserError(f"sample {key!r}: metadata has no 'objects'")
    if not isinstance(captions, list) or len(captions) <= CAPTION_KINDS[kind]:
        raise UserError(f"sample {key!r}: metadata has no {kind} caption (captions[{CAPTION_KINDS[kind]}])")
    fields = ("colour", "shape", "size", "position")
    for index, obj in enumerate(objects):
        if not isinstance(obj, dict) or any(not isinstance(obj.get(f), str) for f in fields):
            raise UserError(f"sample {key!r}: objects[{index}] needs string fields {', '.join(fields)}")
    return GenEvalPrompt(prompt=captions[CAPTION_KINDS[kind]], tag=f"{kind}:{len(objects)}",
                         include=_include_items(objects, kind), exclude=[], key=key)


def prompts_from_metas(metas: Iterable[dict], kinds: Sequence[str] = ("short", "long")) -> list[GenEvalPrompt]:
    """One prompt per sample and caption kind, sample-major (sample 0's kinds first)."""
    return [prompt_from_meta(meta, kind) for meta in metas for kind in kinds]


def read_split_metas(data_dir: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    """Metadata of the first ``limit`` samples of a ShapesWorld split (images not decoded)."""
    from unified_mm.data.shards import ShardDataset, resolve_shards  # webdataset: import lazily

    dataset = ShardDataset(resolve_shards(data_dir, split), split_by_rank=False, decode_image=False)
    return [sample.meta for sample in islice(dataset, limit)]


def prompts_from_split(data_dir: str | Path, split: str = "test", kinds: Sequence[str] = ("short", "long"),
                       limit: int | None = None) -> list[GenEvalPrompt]:
    """GenEval prompts for the first ``limit`` samples of a ShapesWorld split."""
    return prompts_from_metas(read_split_metas(data_dir, split, limit), kinds)


def world_config(data_dir: str | Path) -> ShapesWorldConfig:
    """The generator config saved with a ShapesWorld dataset (defaults when absent)."""
    path = Path(data_dir) / "config.yaml"
    return load_config(ShapesWorldConfig, path) if path.is_file() else ShapesWorldConfig()


def reference_render(meta: dict, cfg: ShapesWorldConfig):
    """The ground-truth image of a sample, re-rendered from its metadata (PIL RGB)."""
    return render(scene_from_meta(meta), cfg)


# ---------------------------------------------------------------------------------------------
# Judging
# ---------------------------------------------------------------------------------------------

def _requirement(item: dict, cfg: ShapesWorldConfig, where: str) -> dict:
    """An include/exclude item as analyser attributes, every value checked against the world."""
    vocabulary = {"shape": cfg.shapes, "colour": list(cfg.colours), "size": list(cfg.sizes),
                  "position": ALL_POSITIONS}
    requirement = {}
    for field_name, attribute in _FIELD_TO_ATTRIBUTE.items():
        if field_name not in item:
            continue
        value = item[field_name]
        if attribute == "position" and not isinstance(value, str):
            raise UserError(f"{where}: relative position {value!r} cannot be judged on ShapesWorld; "
                            f"use an absolute position name ({', '.join(ALL_POSITIONS)})")
        if value not in vocabulary[attribute]:
            raise UserError(f"{where}: {field_name} {value!r} is not in this ShapesWorld "
                            f"(known: {', '.join(vocabulary[attribute])})")
        requirement[attribute] = value
    return requirement


def requirements_for(prompt: GenEvalPrompt, cfg: ShapesWorldConfig) -> list[dict]:
    """One analyser requirement per object the prompt asks for (items repeated ``count`` times)."""
    where = f"prompt {prompt.key or prompt.prompt!r}"
    return [_requirement(item, cfg, f"{where} include[{i}]")
            for i, item in enumerate(prompt.include) for _ in range(item["count"])]


class Judgement(NamedTuple):
    scores: dict[str, bool | None]     # colour/shape/count/position/size; None: not in the prompt
    whole: bool
    detected: list[DetectedObject]


def _excluded_ok(detected: list[DetectedObject], prompt: GenEvalPrompt, cfg: ShapesWorldConfig) -> bool:
    for i, item in enumerate(prompt.exclude):
        requirement = _requirement(item, cfg, f"prompt {prompt.key or prompt.prompt!r} exclude[{i}]")
        matching = sum(all(getattr(obj, a) == v for a, v in requirement.items()) for obj in detected)
        if matching >= item["count"]:
            return False
    return True


def judge_detections(detected: Sequence[DetectedObject], prompt: GenEvalPrompt, cfg: ShapesWorldConfig,
                     exact_count: bool = True) -> Judgement:
    """Score already-analysed detections against a prompt (rules in the module docstring)."""
    detected = list(detected)
    requirements = requirements_for(prompt, cfg)
    scores: dict[str, bool | None] = {}
    for attribute in ATTRIBUTES:
        asked = [{attribute: r[attribute]} for r in requirements if attribute in r]
        scores[attribute] = satisfies(detected, asked, exact_count=False) if asked else None
    scores["count"] = len(detected) == len(requirements)
    whole = satisfies(detected, requirements, exact_count=exact_count) and _excluded_ok(detected, prompt, cfg)
    return Judgement({name: scores[name] for name in SCORE_NAMES}, whole, detected)


def judge_image(image, prompt: GenEvalPrompt, cfg: ShapesWorldConfig | None = None,
                exact_count: bool = True) -> Judgement:
    """Analyse one generated image (PIL or HxWx3 array) and score it against ``prompt``."""
    cfg = cfg or ShapesWorldConfig()
    return judge_detections(analyse(image, cfg), prompt, cfg, exact_count)


def _accuracies(judgements: Sequence[Judgement]) -> dict:
    """Whole-prompt accuracy and each attribute's over the judgements that name it."""
    result: dict = {"whole": sum(j.whole for j in judgements) / len(judgements)}
    for name in SCORE_NAMES:
        applicable = [j.scores[name] for j in judgements if j.scores[name] is not None]
        if applicable:
            result[name] = sum(applicable) / len(applicable)
    return result


def summarise(judgements: Sequence[Judgement], prompts: Sequence[GenEvalPrompt]) -> dict:
    """``{"whole", "colour", "shape", "count", "position", "size", "per_tag", "per_tag_scores",
    "num_prompts"}``: accuracies in [0, 1]; an attribute no prompt names is left out. ``per_tag``
    is the whole-prompt accuracy of each prompt tag (e.g. "short:1"), ``per_tag_scores`` all of
    that tag's accuracies and its number of prompts ("n")."""
    if len(judgements) != len(prompts):
        raise ValueError(f"{len(judgements)} judgements for {len(prompts)} prompts")
    if not judgements:
        raise ValueError("no judgements to summarise")
    result = _accuracies(judgements)
    by_tag: dict[str, list[Judgement]] = defaultdict(list)
    for judgement, prompt in zip(judgements, prompts):
        by_tag[prompt.tag].append(judgement)
    result["per_tag"] = {tag: _accuracies(v)["whole"] for tag, v in sorted(by_tag.items())}
    result["per_tag_scores"] = {tag: {**_accuracies(v), "n": len(v)} for tag, v in sorted(by_tag.items())}
    result["num_prompts"] = len(judgements)
    return result


def evaluate_images(images: Sequence, prompts: Sequence[GenEvalPrompt], cfg: ShapesWorldConfig | None = None,
                    exact_count: bool = True) -> tuple[dict, list[Judgement]]:
    """Judge ``images[i]`` against ``prompts[i]`` for all i; returns (summary, judgements)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    cfg = cfg or ShapesWorldConfig()
    judgements = [judge_image(image, prompt, cfg, exact_count) for image, prompt in zip(images, prompts)]
    return summarise(judgements, prompts), judgements


def reference_accuracy(metas: Sequence[dict], cfg: ShapesWorldConfig,
                       kinds: Sequence[str] = ("short", "long")) -> dict:
    """The judge's score on ground truth: every sample re-rendered from its metadata and judged
    against its own prompts. It should be 1.0 throughout; anything less is the judge's error."""
    prompts, judgements = [], []
    for meta in metas:
        detected = analyse(reference_render(meta, cfg), cfg)   # once per image, judged per kind
        for kind in kinds:
            prompts.append(prompt_from_meta(meta, kind))
            judgements.append(judge_detections(detected, prompts[-1], cfg))
    return summarise(judgements, prompts)
