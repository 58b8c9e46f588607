"""Pixel analyser: recover every ShapesWorld object (colour, shape, size, cell) from an image.

It is the judge of generated images, so it is deliberately model-free and exact on clean renders:

1. background = per-channel median of the whole image (objects cover well under half of it);
2. coverage of each pixel = alpha in [0, 1] of its best-fitting palette colour, modelling the
   pixel as background + alpha * (colour - background);
3. a grid cell holds an object when enough of its pixels are mostly covered (alpha > 0.5): the
   anti-aliased fringe a neighbour's edge leaves in a cell is at most ~0.3 covered, and pixel
   noise rarely fakes half a colour's contrast, whereas a raw distance threshold mistakes both;
4. colour = the palette entry whose direction from the background best explains those pixels;
   alpha map = every cell pixel's projection onto that background->colour direction;
5. shape and size = nearest template (sum of squared alpha differences) among alpha maps drawn by
   the very same renderer for every shape x size x jitter in that cell, each also pre-blurred
   (sigma 0.5 and 1 px) so soft generated images still meet their template (cached per config).

Measured accuracy (tests/test_analyser.py, bench/bench_data.py): every object right on clean
renders, and robust to N(0, 0.05) pixel noise and sigma 0.5 px gaussian blur.
"""
from __future__ import annotations

import functools
import itertools
from typing import Iterable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from unified_mm.data.shapesworld import (GRID, POSITION_NAMES, SUPERSAMPLE, ShapesWorldConfig,
                                         draw_shape, object_box_4x)

CORE_ALPHA = 0.5             # a pixel is "core" when its best colour covers more than half of it
MIN_CORE_FRACTION = 0.3      # occupied cell: core pixels >= this x core pixels of the smallest object
TEMPLATE_BLURS = (0.0, 0.5, 1.0)  # gaussian sigmas (px) of template variants: soft images still match


class DetectedObject(NamedTuple):
    colour: str
    shape: str
    size: str
    cell: tuple[int, int]  # (row, col)
    position: str


class _Templates(NamedTuple):
    windows: dict              # cell -> (row slice, col slice): pixels whose centre is in the cell
    alphas: dict               # cell -> float32 [K, variants, h, w] template coverage maps
    labels: list               # K x (shape, size), aligned with the first axis of alphas
    min_core: int              # fewest core pixels that make a cell count as occupied


# ---------------------------------------------------------------------------------------------
# Templates and palette (cached per config)
# ---------------------------------------------------------------------------------------------

def _config_key(cfg: ShapesWorldConfig) -> tuple:
    return (cfg.image_size, tuple(cfg.shapes), tuple(cfg.sizes.items()), cfg.jitter,
            tuple((name, tuple(rgb)) for name, rgb in cfg.colours.items()), cfg.background_max)


def _cell_window(index: int, cell_size: float) -> slice:
    """Pixels whose centres (i + 0.5) fall inside cell ``index``; windows tile the image."""
    start = int(np.ceil(index * cell_size - 0.5))
    stop = int(np.ceil((index + 1) * cell_size - 0.5))
    return slice(start, stop)


def template_alpha(shape: str, size: str, cell: tuple[int, int], offset: tuple[int, int],
                   cfg: ShapesWorldConfig) -> np.ndarray:
    """Coverage map float32 [S, S] in [0, 1] of one object, drawn exactly as :func:`render` does."""
    big = cfg.image_size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, object_box_4x(size, cell, offset, cfg), 255)
    small = canvas.resize((cfg.image_size, cfg.image_size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def _blurred(alpha: np.ndarray, sigma: float) -> np.ndarray:
    return alpha if sigma == 0 else gaussian_blur(alpha[..., None], sigma)[..., 0].astype(np.float32)


@functools.lru_cache(maxsize=8)
def _templates_for(key: tuple) -> _Templates:
    cfg = ShapesWorldConfig(image_size=key[0], shapes=list(key[1]), sizes=dict(key[2]), jitter_px=key[3])
    labels = [(shape, size) for shape in cfg.shapes for size in cfg.sizes]
    windows, alphas, core_counts = {}, {}, []
    for cell in itertools.product(range(GRID), range(GRID)):
        rows, cols = _cell_window(cell[0], cfg.cell_size), _cell_window(cell[1], cfg.cell_size)
        windows[cell] = (rows, cols)
        maps = []  # K x [variants = offsets x blurs, h, w]
        for shape, size in labels:
            sharp = [template_alpha(shape, size, cell, (dx, dy), cfg)
                     for dx in cfg.offsets for dy in cfg.offsets]
            core_counts.append(int((sharp[0] > CORE_ALPHA).sum()))
            variants = [_blurred(alpha, sigma)[rows, cols] for alpha in sharp for sigma in TEMPLATE_BLURS]
            maps.append(np.stack(variants))
        alphas[cell] = np.stack(maps)  # [K, offsets x blurs, h, w]
    min_core = max(2, round(MIN_CORE_FRACTION * min(core_counts)))
    return _Templates(windows, alphas, labels, min_core)


@functools.lru_cache(maxsize=8)
def _palette_for(key: tuple) -> tuple[list[str], np.ndarray]:
    """Colour names and float32 [P, 3] colours in [0, 1]."""
    colours = dict(key[4])
    names = list(colours)
    return names, np.array([colours[n] for n in names], np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------

def to_float_pixels(image, image_size: int) -> np.ndarray:
    """PIL image or HxWx3 array (uint8, or float in [0, 1]) -> float32 [S, S, 3] in [0, 1].
    Images of another size are resized (BOX down, bilinear up) so generators at any resolution
    can be judged."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {pixels.shape}")
    pixels = pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else pixels.astype(np.float32)
    if pixels.shape[:2] != (image_size, image_size):
        method = Image.Resampling.BOX if pixels.shape[0] > image_size else Image.Resampling.BILINEAR
        channels = [Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize((image_size, image_size), method)
                    for c in range(3)]
        pixels = np.stack([np.asarray(c) for c in channels], axis=-1)
    return pixels


def _fit_palette(difference: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model each pixel as alpha * direction, alpha clipped to [0, 1], for every palette entry.

    difference: [N, 3] pixel - background; directions: [P, 3] colour - background.
    Returns alpha [N, P] and squared residuals [N, P].
    """
    alpha = difference @ directions.T / (directions * directions).sum(1)           # [N, P]
    alpha = np.clip(alpha, 0.0, 1.0)
    residual = difference[:, None, :] - alpha[..., None] * directions[None, :, :]  # [N, P, 3]
    return alpha, (residual * residual).sum(axis=2)


def _coverage(difference: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """float [S, S]: alpha of each pixel's best-fitting (least residual) palette colour."""
    alpha, residual = _fit_palette(difference.reshape(-1, 3), directions)   # [S*S, P] each
    best = np.argmin(residual, axis=1)                                     # [S*S]
    return alpha[np.arange(len(best)), best].reshape(difference.shape[:2])


def analyse(image, cfg: ShapesWorldConfig | None = None) -> list[DetectedObject]:
    """Every object found in ``image``, in reading order of their cells."""
    cfg = cfg or ShapesWorldConfig()
    key = _config_key(cfg)
    templates = _templates_for(key)
    names, palette = _palette_for(key)
    pixels = to_float_pixels(image, cfg.image_size)               # [S, S, 3]
    background = np.median(pixels.reshape(-1, 3), axis=0)        # [3]
    difference = pixels - background                              # [S, S, 3]
    directions = palette - background                             # [P, 3]
    is_core = _coverage(difference, directions) > CORE_ALPHA      # [S, S]
    found = []
    for cell, (rows, cols) in templates.windows.items():
        core = is_core[rows, cols]                                # [h, w]
        if core.sum() < templates.min_core:
            continue
        window = difference[rows, cols]                           # [h, w, 3]
        _, residual = _fit_palette(window[core], directions)      # [N, P]
        colour = int(np.argmin(residual.sum(axis=0)))
        direction = directions[colour]
        alpha = window @ direction / float(direction @ direction)  # [h, w] coverage estimate
        errors = ((templates.alphas[cell] - alpha) ** 2).sum(axis=(2, 3))  # [K, variants]
        shape, size = templates.labels[int(np.argmin(errors.min(axis=1)))]
        found.append(DetectedObject(names[colour], shape, size, cell, POSITION_NAMES[cell[0]][cell[1]]))
    return found


# ---------------------------------------------------------------------------------------------
# Comparing detections with expectations
# ---------------------------------------------------------------------------------------------

ATTRIBUTES = ("colour", "shape", "size", "cell")


def _get(obj, attribute: str):
    """Attribute of a DetectedObject / SceneObject / metadata dict; cells become tuples."""
    value = obj[attribute] if isinstance(obj, dict) else getattr(obj, attribute)
    return tuple(value) if attribute == "cell" else value


def object_signature(obj) -> tuple:
    """(colour, shape, size, cell) of any object representation."""
    return tuple(_get(obj, a) for a in ATTRIBUTES)


def scene_matches(detected: Iterable, expected_objects: Iterable) -> bool:
    """True when the detected objects are exactly the expected ones (no more, no fewer)."""
    return sorted(map(object_signature, detected)) == sorted(map(object_signature, expected_objects))


def attribute_scores(detected: Iterable, expected_objects: Iterable) -> dict[str, float]:
    """Per-attribute agreement, pairing objects by cell.

    ``cell``: fraction of expected objects whose cell holds a detection; ``colour``/``shape``/
    ``size``: fraction of expected objects whose same-cell detection has that attribute right;
    ``count``: 1.0 when the numbers of objects agree; ``exact``: :func:`scene_matches`.
    """
    detected, expected = list(detected), list(expected_objects)
    by_cell = {_get(d, "cell"): d for d in detected}
    scores = {"cell": 0.0, "colour": 0.0, "shape": 0.0, "size": 0.0}
    for obj in expected:
        match = by_cell.get(_get(obj, "cell"))
        if match is None:
            continue
        scores["cell"] += 1
        for attribute in ("colour", "shape", "size"):
            scores[attribute] += _get(match, attribute) == _get(obj, attribute)
    total = max(1, len(expected))
    scores = {name: value / total for name, value in scores.items()}
    scores["count"] = float(len(detected) == len(expected))
    scores["exact"] = float(scene_matches(detected, expected))
    return scores


def satisfies(detected: Iterable, requirements: Iterable[dict], exact_count: bool = True) -> bool:
    """Does some one-to-one pairing give every requirement its own matching detection?

    A requirement names only the attributes a prompt fixes, e.g. ``{"colour": "red", "shape":
    "circle"}`` for "a red circle" (keys: colour, shape, size, cell, position). With
    ``exact_count`` there must be no extra detected objects either.
    """
    detected, requirements = list(detected), list(requirements)
    if len(detected) < len(requirements) or (exact_count and len(detected) != len(requirements)):
        return False

    def fits(obj, requirement: dict) -> bool:
        return all(_get(obj, k) == (tuple(v) if k == "cell" else v) for k, v in requirement.items())

    return any(all(fits(obj, req) for obj, req in zip(chosen, requirements))
               for chosen in itertools.permutations(detected, len(requirements)))


# ---------------------------------------------------------------------------------------------
# Degradations for robustness measurements
# ---------------------------------------------------------------------------------------------

def gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of float [H, W, C] pixels with reflected borders."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * pixels.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(pixels, pad, mode="reflect")
        length = pixels.shape[axis]
        pixels = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(taps))
    return pixels


def degrade(image, noise_std: float = 0.0, blur_sigma: float = 0.0,
            rng: np.random.Generator | None = None) -> np.ndarray:
    """Blur (sigma in px), then add N(0, noise_std) noise in [0, 1] units; returns uint8 [H, W, 3]
    the way a generator's output would arrive."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    pixels = pixels.astype(np.float64) / 255.0
    if blur_sigma > 0:
        pixels = gaussian_blur(pixels, blur_sigma)
    if noise_std > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        pixels = pixels + rng.normal(0.0, noise_std, pixels.shape)
    return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)
