"""ShapesWorld: a tiny synthetic world of coloured shapes on a 3x3 grid, with captions and QA.

Every sample is a scene of 1-3 objects (colour x shape x size) in distinct grid cells on a dark
background. Because the world is this small, everything about an image is known exactly, so the
captions and question/answer pairs are correct by construction and a pixel analyser
(:mod:`unified_mm.data.analyser`) can judge generated images against their prompt.

Determinism: scenes come from ``random.Random`` streams seeded with strings derived from the
master seed (``"shapesworld/{seed}/{split}/scenes"``), and only ``Random.random()`` is used to draw
from them; that is the one method whose sequence Python guarantees across versions (``choice`` and
``randrange`` have changed before). PNGs are encoded with fixed settings and metadata is dumped
with ``sort_keys``, so the same config gives byte-identical samples.

Split disjointness holds by construction: the splits are sampled in the fixed order
:data:`SPLIT_ORDER` (test, then val, then train) and every scene whose :meth:`Scene.signature`
was already produced, in this or any earlier split, is resampled. The signature holds everything
that decides the pixels apart from the optional texture (background colour, and each object's
colour, shape, size, cell and jitter), so no image, nor any texture variant of it, can appear in
two splits. Test and val come first so that growing the train split never changes them.
"""
from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from mmcore.config import ConfigError
from mmcore.errors import UserError

GRID = 3                      # the world is a GRID x GRID board; position names assume 3
SUPERSAMPLE = 4               # shapes are drawn at 4x and box-downsampled: anti-aliased edges
CROSS_ARM = 0.35              # half-width of a cross's arms, as a fraction of its radius
PNG_COMPRESS_LEVEL = 6        # fixed so PNG bytes never depend on a library default
MAX_RESAMPLES = 1000          # attempts to find an unseen scene before giving up
SPLIT_ORDER = ("test", "val", "train")  # sampling (dedupe) order; see the module docstring
KNOWN_SHAPES = ("circle", "square", "triangle", "cross")
POSITION_NAMES = (("top left", "top", "top right"),
                  ("left", "center", "right"),
                  ("bottom left", "bottom", "bottom right"))
LOCATION_PHRASES = {  # position name -> how a sentence says it
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_COLOURS = {  # saturated and bright: far from any dark background and from each other
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 100, 245),
    "yellow": (240, 220, 40), "purple": (170, 60, 225), "cyan": (40, 220, 230),
}
MIN_COLOUR_DISTANCE, MIN_BACKGROUND_DISTANCE = 80, 100  # RGB distances: colour-colour, colour-bg


# ---- Config ----------------------------------------------------------------------------------

@dataclass
class SplitSizes:  # samples per split
    train: int = 20000
    val: int = 1000
    test: int = 1000


@dataclass
class ShapesWorldConfig:
    """The generator's schema (YAML: ``configs/data/shapesworld.yaml``)."""
    seed: int = 0
    image_size: int = 32
    colours: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(DEFAULT_COLOURS))
    shapes: list[str] = field(default_factory=lambda: list(KNOWN_SHAPES))
    sizes: dict[str, float] = field(default_factory=lambda: {"small": 0.28, "large": 0.40})
    jitter_px: int | None = None   # centre offsets are {-j, 0, j}; None: max(1, round(size/32))
    min_objects: int = 1
    max_objects: int = 3
    background_max: int = 60       # background channels are uniform in [0, background_max]
    texture: float = 0.0           # grey per-pixel background noise amplitude, [0,1] units
    splits: SplitSizes = field(default_factory=SplitSizes)
    samples_per_shard: int = 1000

    @property
    def cell_size(self) -> float:  # pixels; fractional in general
        return self.image_size / GRID

    @property
    def jitter(self) -> int:
        if self.jitter_px is not None:
            return self.jitter_px
        return max(1, round(self.image_size / 32))

    @property
    def offsets(self) -> tuple[int, ...]:
        return (-self.jitter, 0, self.jitter) if self.jitter else (0,)

    def split_size(self, split: str) -> int:
        if split not in SPLIT_ORDER:
            raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_ORDER)}")
        return getattr(self.splits, split)

    def validate(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be in [16, 1024], got {self.image_size}")
        _check_words("colours", list(self.colours))
        _check_words("sizes", list(self.sizes))
        _check_words("shapes", self.shapes)
        unknown = [s for s in self.shapes if s not in KNOWN_SHAPES]
        if unknown:
            raise ConfigError(f"shapes: unknown {unknown}; known shapes: {', '.join(KNOWN_SHAPES)}")
        _check_palette(self.colours, self.background_max)
        fractions = sorted(self.sizes.values())
        if fractions[0] <= 0 or any(b < 1.2 * a for a, b in zip(fractions, fractions[1:])):
            raise ConfigError(f"sizes: fractions must be > 0 and differ by >= 20%, got {self.sizes}")
        if self.jitter_px is not None and self.jitter_px < 0:
            raise ConfigError(f"jitter_px must be >= 0, got {self.jitter_px}")
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise ConfigError(f"need 1 <= min_objects <= max_objects <= {GRID * GRID}, "
                              f"got {self.min_objects}, {self.max_objects}")
        if not 0 <= self.texture <= 0.25:
            raise ConfigError(f"texture must be in [0, 0.25], got {self.texture}")
        if any(self.split_size(split) < 0 for split in SPLIT_ORDER):
            raise ConfigError(f"splits: sizes must be >= 0, got {self.splits}")
        if self.samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        _check_geometry(self)


def _check_words(what: str, names: list[str]) -> None:
    if not names:
        raise ConfigError(f"{what}: need at least one entry")
    if len(set(names)) != len(names):
        raise ConfigError(f"{what}: duplicate names in {names}")
    bad = [n for n in names if not (n.isalpha() and n.islower())]
    if bad:
        raise ConfigError(f"{what}: names must be lowercase words (captions use them), got {bad}")


def _check_palette(colours: dict[str, tuple[int, int, int]], background_max: int) -> None:
    """Colours must stay apart from each other and from every possible background colour."""
    if not 0 <= background_max <= 255:
        raise ConfigError(f"background_max must be in [0, 255], got {background_max}")
    rgb = {name: np.array(value, float) for name, value in colours.items()}
    for name, value in rgb.items():
        if value.min() < 0 or value.max() > 255:
            raise ConfigError(f"colours.{name}: channels must be in [0, 255], got {colours[name]}")
        nearest_background = np.clip(value, 0, background_max)
        if np.linalg.norm(value - nearest_background) < MIN_BACKGROUND_DISTANCE:
            raise ConfigError(f"colours.{name} {colours[name]} is too close to the dark background "
                              f"(background_max={background_max})")
    names = list(rgb)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if np.linalg.norm(rgb[a] - rgb[b]) < MIN_COLOUR_DISTANCE:
                raise ConfigError(f"colours.{a} and colours.{b} are too similar to tell apart")


def _check_geometry(cfg: ShapesWorldConfig) -> None:
    """The largest, most jittered object must stay inside its cell, so objects never touch."""
    cell4 = cfg.cell_size * SUPERSAMPLE
    largest = max(cfg.sizes, key=cfg.sizes.get)
    for col in range(GRID):
        for dx in cfg.offsets:
            left, _, right, _ = object_box_4x(largest, (0, col), (dx, 0), cfg)
            if left < col * cell4 or right > (col + 1) * cell4:
                raise ConfigError(
                    f"sizes.{largest}={cfg.sizes[largest]} with jitter {cfg.jitter}px leaves the grid "
                    f"cell at image_size {cfg.image_size}; lower the size fraction or jitter_px")


# ---- Scenes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    cell: tuple[int, int]    # (row, col) on the GRID x GRID board
    offset: tuple[int, int]  # (dx, dy) integer pixel jitter of the centre

    @property
    def position(self) -> str:
        return POSITION_NAMES[self.cell[0]][self.cell[1]]


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]  # in reading order of their cells
    texture_seed: int                 # drawn even when texture is off, so toggling it keeps scenes

    def signature(self) -> tuple:
        """Canonical identity used to keep splits disjoint (texture deliberately left out)."""
        return (self.background,
                tuple(sorted((o.cell, o.colour, o.shape, o.size, o.offset) for o in self.objects)))


def _below(rng: random.Random, n: int) -> int:
    """Uniform int in [0, n) from ``rng.random()`` alone (version-stable, unlike randrange)."""
    return min(int(rng.random() * n), n - 1)


def _pick(rng: random.Random, items):
    return items[_below(rng, len(items))]  # items: a sequence


def _shuffled(rng: random.Random, items: list) -> list:
    """Fisher-Yates shuffle built on :func:`_below` (``random.shuffle`` is not version-stable)."""
    items = list(items)
    for i in range(len(items) - 1, 0, -1):
        j = _below(rng, i + 1)
        items[i], items[j] = items[j], items[i]
    return items


def sample_scene(rng: random.Random, cfg: ShapesWorldConfig) -> Scene:
    """Draw one scene: object count, distinct cells, then each object's attributes."""
    count = cfg.min_objects + _below(rng, cfg.max_objects - cfg.min_objects + 1)
    all_cells = [(row, col) for row in range(GRID) for col in range(GRID)]
    cells = sorted(_shuffled(rng, all_cells)[:count])
    colours, sizes = list(cfg.colours), list(cfg.sizes)
    objects = tuple(
        SceneObject(colour=_pick(rng, colours), shape=_pick(rng, cfg.shapes), size=_pick(rng, sizes),
                    cell=cell, offset=(_pick(rng, cfg.offsets), _pick(rng, cfg.offsets)))
        for cell in cells)
    background = tuple(_below(rng, cfg.background_max + 1) for _ in range(3))
    return Scene(background=background, objects=objects, texture_seed=_below(rng, 2**31))


def iter_scenes(cfg: ShapesWorldConfig, split: str) -> Iterator[Scene]:
    """The scenes of ``split``, after replaying earlier splits so none repeats (module docstring)."""
    cfg.split_size(split)  # raises on an unknown split name
    seen: set[tuple] = set()
    for current in SPLIT_ORDER:
        rng = random.Random(f"shapesworld/{cfg.seed}/{current}/scenes")
        for _ in range(cfg.split_size(current)):
            scene = _sample_unseen(rng, cfg, seen, current)
            if current == split:
                yield scene
        if current == split:
            return


def _sample_unseen(rng: random.Random, cfg: ShapesWorldConfig, seen: set, split: str) -> Scene:
    for _ in range(MAX_RESAMPLES):
        scene = sample_scene(rng, cfg)
        if scene.signature() not in seen:
            seen.add(scene.signature())
            return scene
    raise UserError(f"split {split!r}: found only {len(seen)} distinct scenes in total; the config's "
                    f"scene space is too small for the requested split sizes")


# ---- Rendering -------------------------------------------------------------------------------

def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up everywhere (Python's round() is half-to-even)


def object_centre(cell: tuple[int, int], offset: tuple[int, int], cfg: ShapesWorldConfig,
                  scale: int = 1) -> tuple[float, float]:
    """(x, y) centre in pixels of an image ``scale`` times the output size."""
    row, col = cell
    x = ((col + 0.5) * cfg.cell_size + offset[0]) * scale
    y = ((row + 0.5) * cfg.cell_size + offset[1]) * scale
    return x, y


def object_radius(size: str, cfg: ShapesWorldConfig, scale: int = 1) -> float:
    return cfg.sizes[size] * cfg.cell_size * scale


def object_box_4x(size: str, cell: tuple[int, int], offset: tuple[int, int],
                  cfg: ShapesWorldConfig) -> tuple[int, int, int, int]:
    """Integer (left, top, right, bottom) on the supersampled canvas; right/bottom exclusive."""
    x, y = object_centre(cell, offset, cfg, SUPERSAMPLE)
    r = object_radius(size, cfg, SUPERSAMPLE)
    return _round(x - r), _round(y - r), _round(x + r), _round(y + r)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw ``shape`` filling ``box``; used for images and for the analyser's templates alike."""
    left, top, right, bottom = box
    last_x, last_y = right - 1, bottom - 1  # PIL boxes include their far edge
    if shape == "circle":
        draw.ellipse([left, top, last_x, last_y], fill=fill)
    elif shape == "square":
        draw.rectangle([left, top, last_x, last_y], fill=fill)
    elif shape == "triangle":  # apex up, base along the bottom of the box
        draw.polygon([((left + last_x) / 2, top), (last_x, last_y), (left, last_y)], fill=fill)
    elif shape == "cross":
        cx, cy = (left + right) / 2, (top + bottom) / 2
        arm = CROSS_ARM * (right - left) / 2
        draw.rectangle([left, _round(cy - arm), last_x, _round(cy + arm) - 1], fill=fill)
        draw.rectangle([_round(cx - arm), top, _round(cx + arm) - 1, last_y], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(scene: Scene, cfg: ShapesWorldConfig) -> Image.Image:
    """Output-size background: flat colour plus optional grey texture (same noise per channel)."""
    size = cfg.image_size
    if cfg.texture <= 0:
        return Image.new("RGB", (size, size), scene.background)
    noise = np.random.default_rng(scene.texture_seed).uniform(-1, 1, (size, size, 1))  # [S,S,1]
    pixels = np.asarray(scene.background, np.float64) + noise * cfg.texture * 255      # [S,S,3]
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def render(scene: Scene, cfg: ShapesWorldConfig) -> Image.Image:
    """Draw the scene at SUPERSAMPLE x and box-downsample: an RGB image of ``image_size``."""
    size, big = cfg.image_size, cfg.image_size * SUPERSAMPLE
    canvas = _background(scene, cfg).resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        box = object_box_4x(obj.size, obj.cell, obj.offset, cfg)
        draw_shape(draw, obj.shape, box, tuple(cfg.colours[obj.colour]))
    return canvas.resize((size, size), Image.Resampling.BOX)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


# ---- Text: captions and question/answer pairs ------------------------------------------------

def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def join_phrases(phrases: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions_for(scene: Scene) -> list[str]:
    """Always three, in this order: short, long (size + position), sentence."""
    objects = scene.objects
    short = join_phrases([with_article(f"{o.colour} {o.shape}") for o in objects])
    long = join_phrases([with_article(f"{o.size} {o.colour} {o.shape}") + " " +
                         LOCATION_PHRASES[o.position] for o in objects])
    count = len(objects)
    verb, noun = ("is", "object") if count == 1 else ("are", "objects")
    sentence = f"There {verb} {NUMBER_WORDS[count]} {noun}: {long}."
    return [short, long, sentence]


_ATTRIBUTE_SETS = (("shape",), ("colour",), ("size",), ("colour", "shape"), ("size", "shape"),
                   ("size", "colour"), ("size", "colour", "shape"))


def _phrase(obj: SceneObject, attributes: tuple[str, ...]) -> str:
    """Noun phrase naming ``attributes`` of ``obj``: ("size", "colour") -> "large red object"."""
    words = [getattr(obj, a) for a in ("size", "colour") if a in attributes]
    words.append(obj.shape if "shape" in attributes else "object")
    return " ".join(words)


def unique_references(obj: SceneObject, scene: Scene, avoid: str | None = None) -> list[str]:
    """Noun phrases that pick out ``obj`` alone in ``scene`` without naming attribute ``avoid``."""
    references = []
    for attributes in _ATTRIBUTE_SETS:
        if avoid in attributes:
            continue
        matches = [o for o in scene.objects if all(getattr(o, a) == getattr(obj, a) for a in attributes)]
        if len(matches) == 1:
            references.append(_phrase(obj, attributes))
    return references


def _reference(rng: random.Random, obj: SceneObject, scene: Scene, avoid: str) -> str:
    """"the object in the top left", or an attribute phrase when one is unique."""
    options = [f"object {LOCATION_PHRASES[obj.position]}"] + unique_references(obj, scene, avoid)
    return "the " + _pick(rng, options)


def _qa(kind: str, question: str, answer: str | int) -> dict:
    return {"type": kind, "question": question, "answer": str(answer).lower()}


# Each QA builder takes (rng, scene, cfg) and returns one {type, question, answer} dict.
def _colour_qa(rng, scene: Scene, cfg) -> dict:
    obj = _pick(rng, scene.objects)
    return _qa("colour", f"What colour is {_reference(rng, obj, scene, 'colour')}?", obj.colour)


def _shape_qa(rng, scene: Scene, cfg) -> dict:
    obj = _pick(rng, scene.objects)
    return _qa("shape", f"What shape is {_reference(rng, obj, scene, 'shape')}?", obj.shape)


def _count_qa(rng, scene: Scene, cfg) -> dict:
    variant = _below(rng, 3)
    if variant == 0:
        return _qa("count", "How many objects are there?", len(scene.objects))
    if variant == 1:
        colour = _pick(rng, list(cfg.colours))
        count = sum(o.colour == colour for o in scene.objects)
        return _qa("count", f"How many {colour} objects are there?", count)
    shape = _pick(rng, cfg.shapes)
    return _qa("count", f"How many {plural(shape)} are there?", sum(o.shape == shape for o in scene.objects))


def _position_qa(rng, scene: Scene, cfg) -> dict | None:
    """Ask where an object is; None when no object has a unique description (identical twins)."""
    candidates = [(o, refs) for o in scene.objects if (refs := unique_references(o, scene))]
    if not candidates:
        return None
    obj, references = _pick(rng, candidates)
    return _qa("position", f"Where is the {_pick(rng, references)}?", obj.position)


def _yesno_qa(rng, scene: Scene, cfg) -> dict:
    """Answer chosen first by a coin flip so yes and no are balanced; falls back to yes if no
    negative exists for the chosen template (e.g. a one-colour palette)."""
    want_yes = rng.random() < 0.5
    template = _below(rng, 3)
    occupied = {o.cell: o for o in scene.objects}
    if template == 0:
        present = {(o.colour, o.shape) for o in scene.objects}
        absent = [(c, s) for c in cfg.colours for s in cfg.shapes if (c, s) not in present]
        colour, shape = _pick(rng, sorted(present)) if want_yes or not absent else _pick(rng, absent)
        question = f"Is there {with_article(f'{colour} {shape}')}?"
        return _qa("yesno", question, "yes" if (colour, shape) in present else "no")
    if template == 1:
        empty = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in occupied]
        cell = _pick(rng, sorted(occupied)) if want_yes or not empty else _pick(rng, empty)
        position = POSITION_NAMES[cell[0]][cell[1]]
        return _qa("yesno", f"Is there an object {LOCATION_PHRASES[position]}?",
                   "yes" if cell in occupied else "no")
    obj = _pick(rng, scene.objects)
    others = [c for c in cfg.colours if c != obj.colour]
    colour = obj.colour if want_yes or not others else _pick(rng, others)
    return _qa("yesno", f"Is the object {LOCATION_PHRASES[obj.position]} {colour}?",
               "yes" if colour == obj.colour else "no")


QA_BUILDERS = (_colour_qa, _shape_qa, _count_qa, _position_qa, _yesno_qa)


def describe(scene: Scene, rng: random.Random,
             cfg: ShapesWorldConfig | None = None) -> tuple[list[str], list[dict]]:
    """Captions (see :func:`captions_for`) and one QA per type: colour, shape, count, position,
    yesno (position is left out when no object can be named unambiguously). ``cfg`` supplies the
    vocabulary for negative questions; the default config's when omitted."""
    cfg = cfg or ShapesWorldConfig()
    qa = [item for build in QA_BUILDERS if (item := build(rng, scene, cfg)) is not None]
    return captions_for(scene), qa


# ---- Metadata and splits ---------------------------------------------------------------------

def scene_to_meta(scene: Scene, cfg: ShapesWorldConfig) -> dict:
    """JSON-ready description of the scene; :func:`scene_from_meta` inverts it exactly."""
    objects = []
    for obj in scene.objects:
        x, y = object_centre(obj.cell, obj.offset, cfg)
        objects.append({
            "colour": obj.colour, "shape": obj.shape, "size": obj.size,
            "cell": list(obj.cell), "position": obj.position, "jitter_px": list(obj.offset),
            "centre_px": [round(x, 3), round(y, 3)], "radius_px": round(object_radius(obj.size, cfg), 3),
        })
    return {"image_size": cfg.image_size, "background": list(scene.background),
            "texture_seed": scene.texture_seed, "objects": objects}


def scene_from_meta(meta: dict) -> Scene:
    objects = tuple(SceneObject(colour=o["colour"], shape=o["shape"], size=o["size"],
                                cell=tuple(o["cell"]), offset=tuple(o["jitter_px"]))
                    for o in meta["objects"])
    return Scene(background=tuple(meta["background"]), objects=objects,
                 texture_seed=meta["texture_seed"])


def meta_to_json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True).encode("utf-8")  # sort_keys: byte-identical output


def generate_split(cfg: ShapesWorldConfig, split: str) -> Iterator[tuple[str, bytes, dict]]:
    """Yield ``(key, png_bytes, meta)`` for every sample of ``split``, in order."""
    text_rng = random.Random(f"shapesworld/{cfg.seed}/{split}/text")
    for index, scene in enumerate(iter_scenes(cfg, split)):
        key = f"{split}-{index:06d}"
        captions, qa = describe(scene, text_rng, cfg)
        meta = {"key": key, "split": split, **scene_to_meta(scene, cfg), "captions": captions, "qa": qa}
        yield key, encode_png(render(scene, cfg)), meta
