"""LLaVA / COCO converters: shards that ShardDataset reads back, counted skips, atomic output.

Fixtures are a handful of tiny PNG/JPEG files written in tmp_path, so the file runs in seconds.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcore.errors import UserError
from unified_mm.data import convert_cli
from unified_mm.data.converters import (COCO_FORMAT, EMPTY_TEXT, LLAVA_FORMAT, MALFORMED, MISSING_IMAGE,
                                        NO_CAPTIONS, NOT_ALTERNATING, PATH_ESCAPES, TEXT_ONLY, UNKNOWN_ROLE,
                                        UNREADABLE_IMAGE, ConvertOptions, convert_coco, convert_llava,
                                        normalise_conversation, resize_center_crop, strip_image_placeholder)
from unified_mm.data.shards import ShardDataset, resolve_shards

OPTS = ConvertOptions(image_size=32, shard_size=2, progress=False)


def turns(*pairs):
    return [{"from": who, "value": text} for who, text in pairs]


def qa(question="<image>\nWhat is it?", answer="A thing."):
    return turns(("human", question), ("gpt", answer))


@pytest.fixture
def images(tmp_path) -> Path:
    """An image root with PNG/JPEG/RGBA images, a non-image, and a symlink pointing outside."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(root / "red.jpg", quality=95)
    Image.new("RGB", (40, 80), (10, 200, 10)).save(root / "sub" / "green.png")
    Image.new("RGBA", (20, 20), (10, 10, 200, 100)).save(root / "blue.png")
    (root / "fake.png").write_bytes(b"this is not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    return root


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def read_back(out: Path, split: str = "train") -> list:
    return list(ShardDataset(resolve_shards(out, split)))


# ---------------------------------------------------------------------------------------------
# LLaVA
# ---------------------------------------------------------------------------------------------

LLAVA_GOOD = [
    {"id": "a", "image": "red.jpg", "conversations": qa("<image>\nWhat colour is it?", "Red.")},
    {"id": 7, "image": "sub/green.png",
     "conversations": turns(("Human", "Which shape?\n<image>"), ("assistant", "  A tall one. "),
                            ("user", "Sûre? 色は?"), ("gpt", "Oui — 緑."))},
    {"id": "c", "image": "blue.png", "conversations": qa()},
]
LLAVA_BAD = {
    MISSING_IMAGE: {"id": "m", "image": "nope.jpg", "conversations": qa()},
    UNREADABLE_IMAGE: {"id": "u", "image": "fake.png", "conversations": qa()},
    UNKNOWN_ROLE: {"id": "r", "image": "red.jpg", "conversations": turns(("system", "hi"), ("gpt", "x"))},
    NOT_ALTERNATING: {"id": "n", "image": "red.jpg", "conversations": turns(("human", "a"), ("human", "b"))},
    EMPTY_TEXT: {"id": "e", "image": "red.jpg", "conversations": qa("<image>\n", "x")},
    PATH_ESCAPES: {"id": "p", "image": "../outside.png", "conversations": qa()},
    TEXT_ONLY: {"id": "t", "conversations": qa("Hello?", "Hi.")},
    MALFORMED: {"id": "x", "image": "red.jpg"},
}
ESCAPES = [{"id": "abs", "image": "/etc/hostname", "conversations": qa()},
           {"id": "sym", "image": "link.png", "conversations": qa()}]


def test_llava_converts_and_reads_back(tmp_path, images, caplog):
    data = write_json(tmp_path / "llava.json", LLAVA_GOOD + list(LLAVA_BAD.values()) + ESCAPES)
    result = convert_llava(data, images, tmp_path / "out", OPTS._replace(max_skip_fraction=1.0))

    assert (result.records, result.written) == (13, 3)
    assert result.skipped == {**{reason: 1 for reason in LLAVA_BAD}, PATH_ESCAPES: 3}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == LLAVA_FORMAT and manifest["image_size"] == 32
    assert manifest["splits"]["train"]["samples"] == 3 and manifest["splits"]["train"]["skipped"] == result.skipped
    assert manifest["splits"]["train"]["shards"] == ["train-00000.tar", "train-00001.tar"]

    samples = read_back(tmp_path / "out")
    assert [s.key for s in samples] == ["train-000000", "train-000001", "train-000002"]
    assert all(s.image.size == (32, 32) and s.image.mode == "RGB" for s in samples)
    first, second = samples[0].meta, samples[1].meta
    assert first == {"key": "train-000000", "source_id": "a", "source_index": 0, "source_image": "red.jpg",
                     "image_turn": 0, "image_size": 32,
                     "conversations": [{"role": "user", "text": "What colour is it?"},
                                       {"role": "assistant", "text": "Red."}]}
    assert second["source_id"] == 7 and second["conversations"] == [
        {"role": "user", "text": "Which shape?"}, {"role": "assistant", "text": "A tall one."},
        {"role": "user", "text": "Sûre? 色は?"}, {"role": "assistant", "text": "Oui — 緑."}]
    assert np.abs(np.asarray(samples[0].image, np.int16) - (200, 10, 10)).max() < 8  # JPEG, resized
    assert "fake.png" in caplog.text and "nope.jpg" in caplog.text  # warnings name the files
    assert "/etc/hostname" not in {s.meta.get("source_image") for s in samples}


def test_placeholder_and_turn_rules():
    assert strip_image_placeholder("<image>\nWhat?") == "What?"
    assert strip_image_placeholder("What?\n<image>") == "What?"
    assert strip_image_placeholder("Look <image> here") == "Look here"
    with pytest.raises(Exception, match=NOT_ALTERNATING):
        normalise_conversation(turns(("gpt", "a"), ("human", "b")))
    with pytest.raises(Exception, match=NOT_ALTERNATING):
        normalise_conversation(turns(("human", "a"), ("gpt", "b"), ("human", "c")))
    with pytest.raises(Exception, match=NOT_ALTERNATING):
        normalise_conversation([])


def test_keep_text_only_writes_a_json_only_split(tmp_path, images):
    data = write_json(tmp_path / "llava.json", LLAVA_GOOD + [LLAVA_BAD[TEXT_ONLY]])
    result = convert_llava(data, images, tmp_path / "out", OPTS._replace(keep_text_only=True))
    assert (result.written, result.text_written, result.skipped) == (3, 1, {})
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train_text"]["fields"] == ["json"]
    assert len(read_back(tmp_path / "out")) == 3  # "train" does not pick up train_text shards


def test_workers_and_reruns_give_identical_bytes(tmp_path, images):
    data = write_json(tmp_path / "llava.json", LLAVA_GOOD * 2 + [LLAVA_BAD[MISSING_IMAGE]])
    convert_llava(data, images, tmp_path / "one", OPTS)
    convert_llava(data, images, tmp_path / "two", OPTS._replace(workers=2))
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        if name != "manifest.json":
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------

COCO = {
    "images": [{"id": 1, "file_name": "red.jpg"}, {"id": 2, "file_name": "sub/green.png"},
               {"id": 3, "file_name": "blue.png"}, {"id": 4, "file_name": "nope.jpg"},
               {"id": 5, "file_name": "../outside.png"}],
    "annotations": [{"image_id": 1, "caption": " A red square. "}, {"image_id": 2, "caption": "Ein grünes Bild ✓"},
                    {"image_id": 1, "caption": "Red!"}, {"image_id": 3, "caption": "   "},
                    {"image_id": 4, "caption": "gone"}, {"image_id": 5, "caption": "out"}],
}


def test_coco_converts_and_reads_back(tmp_path, images):
    data = write_json(tmp_path / "coco.json", COCO)
    result = convert_coco(data, images, tmp_path / "out", OPTS._replace(split="val", max_skip_fraction=0.6))
    assert result.written == 2
    assert result.skipped == {NO_CAPTIONS: 1, MISSING_IMAGE: 1, PATH_ESCAPES: 1}
    samples = read_back(tmp_path / "out", "val")
    assert [s.meta["captions"] for s in samples] == [["A red square.", "Red!"], ["Ein grünes Bild ✓"]]
    assert samples[1].meta == {"key": "val-000001", "source_id": 2, "source_index": 1,
                               "source_image": "sub/green.png", "captions": ["Ein grünes Bild ✓"], "image_size": 32}
    assert all(s.image.size == (32, 32) for s in samples)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["format"] == COCO_FORMAT


def test_resize_is_short_side_then_centre_crop():
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :16] = (255, 0, 0)
    array[:, 16:48] = (0, 255, 0)
    array[:, 48:] = (0, 0, 255)
    image = Image.fromarray(array)
    assert (np.asarray(resize_center_crop(image, 32)) == (0, 255, 0)).all()  # short side already 32
    half = np.asarray(resize_center_crop(image, 16)).astype(int)
    assert half.shape == (16, 16, 3) and (np.abs(half[:, 2:-2] - (0, 255, 0)) <= 2).all()
    assert (half[:, 0, 0] > 0).all() and (half[:, -1, 2] > 0).all()  # bicubic blends in the bands


# ---------------------------------------------------------------------------------------------
# Failures and the output directory
# ---------------------------------------------------------------------------------------------

def test_too_many_skips_write_nothing(tmp_path, images):
    data = write_json(tmp_path / "llava.json", LLAVA_GOOD[:1] + [LLAVA_BAD[MISSING_IMAGE]] * 3)
    with pytest.raises(UserError, match=r"3 of 4 records skipped \(missing image file 3\).*0\.5"):
        convert_llava(data, images, tmp_path / "out", OPTS)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_out_dir_rules_and_add_split(tmp_path, images):
    data = write_json(tmp_path / "coco.json", COCO)
    out, opts = tmp_path / "out", OPTS._replace(max_skip_fraction=1.0)
    convert_coco(data, images, out, opts)
    before = (out / "train-00000.tar").read_bytes()
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        convert_coco(data, images, out, opts)
    with pytest.raises(UserError, match="already has split 'train'"):
        convert_coco(data, images, out, opts._replace(add_split=True))
    with pytest.raises(UserError, match="holds 'coco-captions-webdataset/1' at image size 32"):
        convert_coco(data, images, out, opts._replace(add_split=True, split="val", image_size=16))
    convert_coco(data, images, out, opts._replace(add_split=True, split="val", limit=1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 2, "val": 1}
    assert (out / "train-00000.tar").read_bytes() == before and len(read_back(out, "val")) == 1
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="no manifest.json; refusing"):
        convert_coco(data, images, stranger, opts._replace(overwrite=True))


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, images, capsys):
    code = convert_cli.main(["llava", "--json", str(tmp_path / "missing.json"), "--images", str(images),
                             "--out", str(tmp_path / "out"), "--image-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "missing.json" in err and err.startswith("error: ")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    assert convert_cli.main(["coco", "--json", str(bad), "--images", str(images), "--out",
                             str(tmp_path / "out"), "--image-size", "32"]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    assert convert_cli.main(["coco", "--json", str(bad)]) == 2  # usage error, one line too
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_converts_and_prints_a_summary(tmp_path, images, capsys):
    data = write_json(tmp_path / "llava.json", LLAVA_GOOD + [LLAVA_BAD[UNKNOWN_ROLE]])
    code = convert_cli.main(["llava", "--json", str(data), "--images", str(images), "--out",
                             str(tmp_path / "out"), "--image-size", "32", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and out.count("\n") == 1
    assert "wrote 3 train samples (1 shard)" in out and "skipped 1 (unknown role 1)" in out
    assert "warning: skipped record 3: unknown role" in err


def test_precompute_reads_converted_data(tmp_path, images):
    """The converted directory is a valid input of `tokenizer_cli precompute`, unchanged."""
    from tokenizer.export import load_tokenizer, save_tokenizer
    from tokenizer.qlip import QLIP, preset_config
    from unified_mm.tokenizer_cli import precompute, read_precomputed

    small = {"encoder": {"width": 32, "depth": 1, "heads": 2}, "decoder": {"width": 32, "depth": 1, "heads": 2},
             "text": None, "embed_dim": 32}
    torch.manual_seed(0)
    save_tokenizer(QLIP(preset_config("tiny", small)), tmp_path / "export")
    tok = load_tokenizer(tmp_path / "export")
    size = tok.model.config.encoder.image_size
    data = write_json(tmp_path / "coco.json", COCO)
    convert_coco(data, images, tmp_path / "data", OPTS._replace(image_size=size, max_skip_fraction=1.0))
    manifest = precompute(tok, tmp_path / "data", ["train"], tmp_path / "codes", batch_size=4, progress=False)
    assert manifest["splits"]["train"]["samples"] == 2
    rows = list(read_precomputed(tmp_path / "codes", "train", expected_hash=tok.hash))
    assert [meta["captions"][0] for _, _, meta in rows] == ["A red square.", "Ein grünes Bild ✓"]
