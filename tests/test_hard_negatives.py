"""Hard-negative captions (unified_mm/data/hard_negatives.py) and their path through the tokenizer's
data stream: one object's colour or shape changed, the same caption kind, an exact label, and
the batch carries them as extra caption rows."""
import random
from pathlib import Path

import pytest

from mmcore.config import ConfigError, load_config
from mmcore.text_tokenizer import TextTokenizer, train_sentencepiece
from train.tokenizer_data import TokenizerDataConfig, caption_label, image_text_batches, with_negatives
from unified_mm.data import shapesworld_cli
from unified_mm.data.hard_negatives import hard_negative
from unified_mm.data.shapesworld import ShapesWorldConfig, captions_for, generate_split, scene_from_meta

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/data/shapesworld_tiny.yaml"


@pytest.fixture(scope="module")
def world():
    return load_config(ShapesWorldConfig, TINY)


@pytest.fixture(scope="module")
def metas(world):
    return [meta for _, _, meta in generate_split(world, "val")][:60]


def changed_attributes(original, negative_objects):
    """(object index, attribute) pairs whose value differs."""
    return [(i, attribute) for i, (a, b) in enumerate(zip(original, negative_objects))
            for attribute in ("colour", "shape", "size", "position") if a[attribute] != b[attribute]]


def test_one_colour_or_shape_changes_and_the_caption_follows(world, metas):
    choices = {"colour": list(world.colours), "shape": list(world.shapes)}
    rng = random.Random(0)
    kinds_seen = set()
    for meta in metas:
        for kind in range(3):
            negative = hard_negative(meta, kind, rng, choices)
            assert negative is not None
            changed = changed_attributes(meta["objects"], negative.objects)
            assert len(changed) == 1 and changed[0][1] in ("colour", "shape")
            kinds_seen.add(changed[0][1])
            scene = scene_from_meta(meta)
            assert negative.caption != captions_for(scene)[kind]
            # the label is what the negative asserts: never the image's own
            assert (caption_label({"objects": negative.objects}, kind, negative.caption)
                    != caption_label(meta, kind, meta["captions"][kind]))
    assert kinds_seen == {"colour", "shape"}
    # deterministic in the rng
    again = [hard_negative(metas[0], 0, random.Random(5), choices) for _ in range(2)]
    assert again[0] == again[1]


def test_no_objects_or_no_alternative_gives_none(metas):
    assert hard_negative({"captions": ["a photo"]}, 0, random.Random(0), {"colour": ["red"]}) is None
    single = next(m for m in metas if len(m["objects"]) == 1)
    only = {"colour": [single["objects"][0]["colour"]], "shape": [single["objects"][0]["shape"]]}
    assert hard_negative(single, 0, random.Random(0), only) is None


def test_batches_carry_k_negatives_per_image(tmp_path):
    assert shapesworld_cli.main(["--config", str(TINY), "--out", str(tmp_path / "data"), "--quiet",
                                 "splits.train=40", "splits.val=8", "splits.test=8", "samples_per_shard=20"]) == 0
    texts = ["a red circle and a blue square", "a large green triangle in the top left",
             "There are two objects: a small yellow cross at the top.", "purple cyan"] * 20
    tokenizer = TextTokenizer(train_sentencepiece(texts, tmp_path / "text.model", vocab_size=300))
    cfg = TokenizerDataConfig(data=str(tmp_path / "data"), shuffle_buffer=8, caption_weights=[1.0, 1.0, 1.0],
                              hard_negatives=2)
    batch = next(image_text_batches(cfg, tokenizer, 6, 48, 32, seed=0, rank=0))
    assert batch.negative_ids.shape == (12, batch.text_ids.shape[1]) and len(batch.negative_labels) == 12
    # K per image, in order: each differs from its own image's label
    assert all(batch.negative_labels[2 * i + j] != batch.labels[i] for i in range(6) for j in range(2))
    ids, mask = with_negatives(batch)
    assert ids.shape[0] == 18 and mask[6:].sum(1).min() > 0  # every negative has tokens
    plain = next(image_text_batches(TokenizerDataConfig(**{**cfg.__dict__, "hard_negatives": 0}), tokenizer, 6, 48,
                                    32, seed=0, rank=0))
    assert plain.negative_ids is None and plain.keys == batch.keys and plain.labels == batch.labels
    with pytest.raises(ConfigError, match="hard_negatives"):
        TokenizerDataConfig(hard_negatives=-1).validate()


def test_attribute_weights_choose_what_changes(world, metas):
    choices = {"colour": list(world.colours), "shape": list(world.shapes)}

    def shape_share(weights, n=600):
        rng, changed = random.Random(1), []
        for i in range(n):
            meta = metas[i % len(metas)]
            negative = hard_negative(meta, 0, rng, choices, weights)
            changed += [a for _, a in changed_attributes(meta["objects"], negative.objects)]
        return changed.count("shape") / len(changed)

    # by default every alternative value is equally likely: 3 shapes of 8 alternatives
    assert abs(shape_share(None) - len(world.shapes[1:]) / (len(world.colours) + len(world.shapes) - 2)) < 0.06
    assert abs(shape_share({"colour": 1.0, "shape": 3.0}) - 0.75) < 0.06
    assert shape_share({"colour": 0.0, "shape": 1.0}) == 1.0
    assert shape_share({"colour": 1.0}) == 0.0  # a missing attribute weighs 0
    # only zero-weight attributes have an alternative: no negative
    single = next(m for m in metas if len(m["objects"]) == 1)
    no_shape = {"colour": list(world.colours), "shape": [single["objects"][0]["shape"]]}
    assert hard_negative(single, 0, random.Random(0), no_shape, {"shape": 1.0}) is None


@pytest.mark.parametrize("weights, message", [
    ({"size": 1.0}, "unknown attributes"),
    ({"colour": -1.0, "shape": 2.0}, "non-negative"),
    ({"colour": 0.0}, "positive sum"),
])
def test_attribute_weights_are_validated(weights, message):
    with pytest.raises(ConfigError, match=message):
        TokenizerDataConfig(hard_negative_weights=weights).validate()
