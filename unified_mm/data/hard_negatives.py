"""Hard-negative captions for the tokenizer's contrastive loss (NegCLIP-style), from scene metadata.

Why: in a contrastive batch of ShapesWorld images almost every wrong caption already differs from
the right one in its colours, so colour alone separates the batch and shape is barely learned
(the demo's stage 1 measured zero-shot colour 100%, shape 52%: small squares 13%, large
triangles 17%). A caption that is right about everything except one object's colour or shape is
a negative only the wanted feature can reject. NegCLIP (Yuksekgonul et al., ICLR 2023) builds such
negatives by swapping words in real captions; ShapesWorld's metadata lets us swap the attribute
itself and re-caption the scene, so the negative is grammatical, of the same caption kind, and its
positive label is exact (it is a positive for any image it truly describes).

This is our addition to QLIP's recipe (the paper trains with plain in-batch negatives); it is off
unless ``data.hard_negatives > 0`` and needs ShapesWorld-style ``objects`` metadata: samples
without it get no negatives.
"""
from __future__ import annotations

import dataclasses
import random
from typing import NamedTuple

from unified_mm.data.shapesworld import Scene, captions_for, scene_from_meta

SWAPPABLE = ("colour", "shape")


class HardNegative(NamedTuple):
    caption: str
    objects: list[dict]  # the changed scene's objects (colour, shape, size, position): its label's source


def object_dicts(scene: Scene) -> list[dict]:
    return [{"colour": o.colour, "shape": o.shape, "size": o.size, "position": o.position} for o in scene.objects]


def hard_negative(meta: dict, kind: int, rng: random.Random, choices: dict[str, list[str]],
                  weights: dict[str, float] | None = None) -> HardNegative | None:
    """A caption of kind ``kind`` (0 short, 1 long, 2 sentence) for ``meta``'s scene with one
    object's colour or shape replaced by another value from ``choices`` (attribute -> names).
    None when ``meta`` has no usable objects or no attribute has an alternative.

    ``weights`` (attribute -> weight): the attribute to change is drawn by these weights, then its
    new value uniformly; empty or None: every alternative value is equally likely (with 6 colours
    and 4 shapes, 5 of 8 negatives change a colour)."""
    try:
        scene = scene_from_meta(meta)
    except (KeyError, TypeError, ValueError):
        return None
    if not scene.objects:
        return None
    index = rng.randrange(len(scene.objects))
    target = scene.objects[index]
    options = [(attribute, value) for attribute in SWAPPABLE
               for value in choices.get(attribute, []) if value != getattr(target, attribute)]
    if not options:
        return None
    if weights:
        attributes = sorted({attribute for attribute, _ in options}, key=SWAPPABLE.index)
        if sum(weights.get(a, 0.0) for a in attributes) <= 0:
            return None  # only zero-weight attributes have alternatives here
        attribute = rng.choices(attributes, [weights.get(a, 0.0) for a in attributes])[0]
        options = [option for option in options if option[0] == attribute]
    attribute, value = options[rng.randrange(len(options))]
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(target, **{attribute: value})
    changed = dataclasses.replace(scene, objects=tuple(objects))
    captions = captions_for(changed)
    return HardNegative(captions[min(kind, len(captions) - 1)], object_dicts(changed))
