"""ShapesWorld generator: determinism, split disjointness, truthful captions/QA, CLI errors."""
import hashlib
import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcore.config import ConfigError, load_config
from mmcore.errors import UserError
from unified_mm.data.shapesworld import (SPLIT_ORDER, ShapesWorldConfig, SplitSizes, describe,
                                         generate_split, iter_scenes, render, sample_scene,
                                         scene_from_meta)
from unified_mm.data.shapesworld_cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "data" / "shapesworld_tiny.yaml"
# Written out here rather than imported, so the QA check below is an independent reading.
LOCATIONS = {"in the top left": (0, 0), "at the top": (0, 1), "in the top right": (0, 2),
             "on the left": (1, 0), "in the center": (1, 1), "on the right": (1, 2),
             "in the bottom left": (2, 0), "at the bottom": (2, 1), "in the bottom right": (2, 2)}
POSITIONS = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0),
             "center": (1, 1), "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1),
             "bottom right": (2, 2)}


@pytest.fixture(scope="module")
def tiny_cfg() -> ShapesWorldConfig:
    return load_config(ShapesWorldConfig, TINY)


@pytest.fixture(scope="module")
def tiny_samples(tiny_cfg) -> dict:
    """split -> list of (key, png bytes, meta) for the tiny config."""
    return {split: list(generate_split(tiny_cfg, split)) for split in SPLIT_ORDER}


def run_cli(*args: str) -> int:
    return main(["--quiet", *args])


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


# ---------------------------------------------------------------------------------------------
# Determinism and splits
# ---------------------------------------------------------------------------------------------

def test_cli_writes_byte_identical_shards(tmp_path, tiny_cfg):
    overrides = ["splits.train=120", "splits.val=40", "splits.test=40", "samples_per_shard=50"]
    for name in ("a", "b"):
        assert run_cli("--config", str(TINY), "--out", str(tmp_path / name), *overrides) == 0
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["splits"]["train"] == {"samples": 120, "shards": [
        "train-00000.tar", "train-00001.tar", "train-00002.tar"]}
    entries = read_tar(tmp_path / "a" / "train-00002.tar")
    assert len(entries) == 2 * 20 and "train-000100.png" in entries and "train-000100.json" in entries
    reloaded = load_config(ShapesWorldConfig, tmp_path / "a" / "config.yaml")
    assert reloaded.splits == SplitSizes(train=120, val=40, test=40)


def test_shard_content_matches_generator(tmp_path, tiny_cfg, tiny_samples):
    assert run_cli("--config", str(TINY), "--out", str(tmp_path)) == 0
    entries = read_tar(tmp_path / "val-00000.tar")
    for key, png, meta in tiny_samples["val"]:
        assert entries[f"{key}.png"] == png
        assert json.loads(entries[f"{key}.json"]) == meta


def test_generator_is_stable():
    """Golden hash of the first metadata: changes only when the generator's output changes.
    Update it deliberately, knowing that every dataset built before changes too."""
    cfg = ShapesWorldConfig(splits=SplitSizes(train=0, val=0, test=20))
    blob = "\n".join(json.dumps(meta, sort_keys=True) for _, _, meta in generate_split(cfg, "test"))
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert digest == GOLDEN_TEST_META_SHA, digest


GOLDEN_TEST_META_SHA = "87c6c7333d7a20c0"


def test_splits_share_no_image_or_scene(tiny_samples):
    seen_png, seen_scene = {}, {}
    for split, samples in tiny_samples.items():
        for _, png, meta in samples:
            signature = scene_from_meta(meta).signature()
            assert seen_png.setdefault(png, split) == split, f"image in {seen_png[png]} and {split}"
            assert seen_scene.setdefault(signature, split) == split
    assert len(seen_png) == sum(len(s) for s in tiny_samples.values())  # also unique within splits


def test_dedupe_holds_by_construction_in_a_tiny_world():
    """Nine possible scenes: the splits must use all nine exactly once, and a tenth fails."""
    world = dict(colours={"red": (230, 40, 40)}, shapes=["circle"], sizes={"small": 0.3},
                 jitter_px=0, background_max=0, max_objects=1)
    cfg = ShapesWorldConfig(**world, splits=SplitSizes(train=3, val=3, test=3))
    cfg.validate()
    cells = [s.objects[0].cell for split in SPLIT_ORDER for s in iter_scenes(cfg, split)]
    assert sorted(cells) == [(r, c) for r in range(3) for c in range(3)]
    too_many = ShapesWorldConfig(**world, splits=SplitSizes(train=4, val=3, test=3))
    with pytest.raises(UserError, match="scene space is too small"):
        list(iter_scenes(too_many, "train"))


def test_eval_splits_do_not_depend_on_train_size(tiny_cfg):
    bigger = load_config(ShapesWorldConfig, TINY, ["splits.train=500"])
    for split in ("val", "test"):
        first = [meta for _, _, meta in generate_split(tiny_cfg, split)]
        assert first == [meta for _, _, meta in generate_split(bigger, split)]


def test_metadata_reproduces_the_image(tiny_cfg, tiny_samples):
    for key, png, meta in tiny_samples["test"][:50]:
        image = Image.open(io.BytesIO(png))
        assert image.mode == "RGB" and image.size == (32, 32)
        assert np.array_equal(np.asarray(image), np.asarray(render(scene_from_meta(meta), tiny_cfg)))
        assert meta["key"] == key and meta["image_size"] == 32


def test_64px_renders_and_keeps_objects_in_their_cells():
    cfg = ShapesWorldConfig(image_size=64)
    cfg.validate()
    assert cfg.jitter == 2
    scene = sample_scene(random.Random(3), cfg)
    assert render(scene, cfg).size == (64, 64)


# ---------------------------------------------------------------------------------------------
# Captions and QA
# ---------------------------------------------------------------------------------------------

def resolve(reference: str, objects: list[dict]) -> dict:
    """The single object a noun phrase like "large red object" or "object on the left" names."""
    if reference.startswith("object "):
        matches = [o for o in objects if tuple(o["cell"]) == LOCATIONS[reference[len("object "):]]]
    else:
        words = reference.split()
        matches = [o for o in objects
                   if all(w == "object" or w in (o["size"], o["colour"], o["shape"]) for w in words)]
    assert len(matches) == 1, f"{reference!r} is ambiguous or matches nothing in {objects}"
    return matches[0]


def expected_answer(question: str, objects: list[dict]) -> str:
    """Re-derive the answer of any ShapesWorld question from the objects alone."""
    patterns = [
        (r"What colour is the (.+)\?", lambda m: resolve(m[1], objects)["colour"]),
        (r"What shape is the (.+)\?", lambda m: resolve(m[1], objects)["shape"]),
        (r"Where is the (.+)\?", lambda m: resolve(m[1], objects)["position"]),
        (r"How many objects are there\?", lambda m: str(len(objects))),
        (r"How many (\w+) objects are there\?",
         lambda m: str(sum(o["colour"] == m[1] for o in objects))),
        (r"How many (\w+?)(es|s) are there\?",
         lambda m: str(sum(o["shape"] in (m[1], m[1] + "e") for o in objects))),
        (r"Is there an object (.+)\?",
         lambda m: "yes" if any(tuple(o["cell"]) == LOCATIONS[m[1]] for o in objects) else "no"),
        (r"Is there an? (\w+) (\w+)\?",
         lambda m: "yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objects) else "no"),
        (r"Is the object (.+) (\w+)\?",
         lambda m: "yes" if resolve("object " + m[1], objects)["colour"] == m[2] else "no"),
    ]
    for pattern, answer in patterns:
        match = re.fullmatch(pattern, question)
        if match:
            return answer(match)
    raise AssertionError(f"unparsed question {question!r}")


def test_qa_answers_follow_from_the_objects(tiny_samples):
    samples = tiny_samples["train"] + tiny_samples["val"]
    types = set()
    yes_no = []
    for _, _, meta in samples:
        for qa in meta["qa"]:
            types.add(qa["type"])
            assert qa["answer"] == expected_answer(qa["question"], meta["objects"]), qa
            assert qa["answer"] == qa["answer"].lower()
            if qa["type"] == "yesno":
                yes_no.append(qa["answer"] == "yes")
        assert [qa["type"] for qa in meta["qa"]] in (
            ["colour", "shape", "count", "position", "yesno"], ["colour", "shape", "count", "yesno"])
    assert types == {"colour", "shape", "count", "position", "yesno"}
    assert 0.4 <= np.mean(yes_no) <= 0.6, f"yes fraction {np.mean(yes_no):.2f}"


def test_positions_and_geometry_are_consistent(tiny_samples, tiny_cfg):
    cell_size = 32 / 3
    for _, _, meta in tiny_samples["test"]:
        cells = [tuple(o["cell"]) for o in meta["objects"]]
        assert len(set(cells)) == len(cells) and 1 <= len(cells) <= 3
        for obj in meta["objects"]:
            row, col = obj["cell"]
            assert POSITIONS[obj["position"]] == (row, col)
            x, y = obj["centre_px"]
            dx, dy = obj["jitter_px"]
            assert dx in (-1, 0, 1) and dy in (-1, 0, 1)
            assert x == pytest.approx((col + 0.5) * cell_size + dx, abs=1e-3)
            assert y == pytest.approx((row + 0.5) * cell_size + dy, abs=1e-3)
            assert obj["radius_px"] == round(tiny_cfg.sizes[obj["size"]] * cell_size, 3)
        assert max(meta["background"]) <= tiny_cfg.background_max


def test_captions_name_every_object(tiny_samples):
    for _, _, meta in tiny_samples["val"]:
        short, long, sentence = meta["captions"][:3]
        objects = meta["objects"]
        assert short == " and ".join(", ".join(f"a {o['colour']} {o['shape']}" for o in objects)
                                     .rsplit(", ", 1))
        for obj in objects:
            assert f"a {obj['size']} {obj['colour']} {obj['shape']}" in long
            assert f"{obj['colour']} {obj['shape']}" in sentence
        locations = [phrase for phrase in LOCATIONS if phrase in long]
        assert sorted(LOCATIONS[p] for p in locations) == sorted(tuple(o["cell"]) for o in objects)
        count_word = ["one", "two", "three"][len(objects) - 1]
        assert sentence.startswith("There ") and f" {count_word} object" in sentence


def test_describe_is_deterministic_given_the_rng(tiny_cfg):
    scene = sample_scene(random.Random(7), tiny_cfg)
    first = describe(scene, random.Random(1), tiny_cfg)
    assert first == describe(scene, random.Random(1), tiny_cfg)
    assert len(first[0]) >= 3


# ---------------------------------------------------------------------------------------------
# Config and CLI errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("image_size=20", "leaves the grid cell"),
    ("colours.red=[30,30,30]", "too close to the dark background"),
    ("colours.pink=[235,45,45]", "too similar"),
    ("shapes=[circle,star]", "unknown"),
    ("max_objects=10", "max_objects"),
    ("splits.val=-1", "splits: sizes must be >= 0"),
    ("samples_per_shard=0", "samples_per_shard"),
    ("sizes.large=0.3", "differ by"),
    ("split.train=3", "did you mean 'splits'"),
])
def test_bad_config_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ShapesWorldConfig, TINY, [override])


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert run_cli("--out", str(a_file)) == 2
    assert "is a file" in capsys.readouterr().err
    assert run_cli("--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")) == 2
    assert "config file not found" in capsys.readouterr().err
    assert run_cli("--config", str(TINY), "--out", str(tmp_path / "o"), "seed=abc") == 2
    assert "expected an integer" in capsys.readouterr().err
    assert run_cli("--out", str(tmp_path), "splits.train=1", "splits.val=1", "splits.test=1") == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_overwrite_removes_stale_shards(tmp_path):
    small = ["splits.train=30", "splits.val=10", "splits.test=10"]
    assert run_cli("--config", str(TINY), "--out", str(tmp_path), *small, "samples_per_shard=10") == 0
    assert (tmp_path / "train-00002.tar").exists()
    assert run_cli("--config", str(TINY), "--out", str(tmp_path), "--overwrite", *small) == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [
        "test-00000.tar", "train-00000.tar", "val-00000.tar"]
