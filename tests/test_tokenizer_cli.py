"""Tokenizer CLI and image API: exact round trips, precomputed shards, and one-line errors.

Everything runs in-process on a tiny random tokenizer (32x32 images, 8x8 tokens, 2 groups of 6
bits) and a ~40-image ShapesWorld, so the whole file takes seconds.
"""
import io
import json
import re
import runpy
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmcore.errors import UserError
from mmcore.text_tokenizer import train_sentencepiece
from tokenizer.export import load_tokenizer, save_tokenizer, tokenizer_hash
from tokenizer.images import (decode_to_pixels, encode_images, image_to_pixels, load_image, pixels_to_uint8,
                              save_png)
from tokenizer.qlip import QLIP, preset_config
from unified_mm import tokenizer_cli
from unified_mm.data import shapesworld_cli
from unified_mm.data.shards import ShardDataset, resolve_shards
from unified_mm.tokenizer_eval import evaluate_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"encoder": {"width": 32, "depth": 1, "heads": 2}, "decoder": {"width": 32, "depth": 1, "heads": 2},
         "text": {"width": 32, "depth": 1, "heads": 2}, "embed_dim": 32}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two exports (with and without text tower), a tiny dataset and three of its images."""
    root = tmp_path_factory.mktemp("tokcli")
    torch.manual_seed(0)
    text_model = train_sentencepiece(["a red circle", "a blue square"] * 20, root / "t.model", vocab_size=300)
    save_tokenizer(QLIP(preset_config("tiny", SMALL)), root / "export", text_tokenizer_path=text_model)
    save_tokenizer(QLIP(preset_config("tiny", {**SMALL, "text": None})), root / "export_notext")
    assert shapesworld_cli.main(["--config", str(ROOT / "configs/data/shapesworld_tiny.yaml"), "--out",
                                 str(root / "data"), "--quiet", "splits.train=20", "splits.val=10",
                                 "splits.test=10", "samples_per_shard=8"]) == 0
    images = []
    for i, sample in enumerate(ShardDataset(resolve_shards(root / "data", "test"))):
        if i == 3:
            break
        sample.image.save(root / f"img{i}.png")
        images.append(str(root / f"img{i}.png"))
    return root, images


def run(capsys, *argv) -> tuple[int, str, str]:
    code = tokenizer_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_encode_decode_round_trip_is_exact(env, capsys, suffix):
    root, images = env
    tok = load_tokenizer(root / "export")
    codes_path, out = root / f"codes{suffix}", root / f"decoded{suffix}"
    assert run(capsys, "encode", "--tokenizer", root / "export", *images, "--out", codes_path, "--bits")[0] == 0
    code, stdout, _ = run(capsys, "decode", "--tokenizer", root / "export", codes_path, "--out", out)
    assert code == 0 and "decoded 3 images" in stdout

    pixels = torch.stack([load_image(p, 32) for p in images])
    with torch.no_grad():
        codes = tok.model.encode_codes(pixels)
        expected = tok.model.decode_group_indices(codes.group_indices)
        recon = tok.model.reconstruct(pixels)
    assert torch.equal(decode_to_pixels(tok.model, codes.group_indices), expected)
    bits, groups = encode_images(tok.model, pixels, batch_size=2)
    assert torch.equal(groups, codes.group_indices) and torch.equal(bits, codes.bits)
    for i, path in enumerate(images):
        decoded = read_png(out / Path(path).name)
        assert np.array_equal(decoded, pixels_to_uint8(expected[i]))
        assert np.array_equal(decoded, pixels_to_uint8(recon[i]))

    code, stdout, _ = run(capsys, "reconstruct", "--tokenizer", root / "export", *images, "--out", root / f"rec{suffix}")
    assert code == 0 and stdout.count("PSNR") == 4
    for path in images:
        assert np.array_equal(read_png(root / f"rec{suffix}" / Path(path).name), read_png(out / Path(path).name))


def test_codes_file_contents(env, capsys):
    root, images = env
    tok = load_tokenizer(root / "export")
    run(capsys, "encode", "--tokenizer", root / "export", images[0], "--out", root / "one.json", "--bits")
    data = json.loads((root / "one.json").read_text())
    assert data["tokenizer_hash"] == tok.hash == tokenizer_hash(root / "export")
    entry = data["images"][0]
    with torch.no_grad():
        codes = tok.model.encode_codes(load_image(images[0], 32)[None])
    assert entry["group_indices"] == codes.group_indices[0].tolist()
    assert entry["bits"][0] == "".join("1" if b else "0" for b in codes.bits[0, 0].tolist())


def test_precompute_matches_encode_codes(env, capsys):
    root, _ = env
    tok = load_tokenizer(root / "export")
    code, stdout, _ = run(capsys, "precompute", "--tokenizer", root / "export", "--data", root / "data",
                          "--splits", "train,val", "--out", root / "codes", "--quiet", "--batch-size", "3")
    assert code == 0 and "train: 20 samples" in stdout
    manifest = json.loads((root / "codes" / "manifest.json").read_text())
    assert manifest["tokenizer_hash"] == tokenizer_hash(root / "export")
    assert (manifest["grid_size"], manifest["num_bits"], manifest["group_size"]) == (8, 12, 6)
    assert manifest["splits"]["train"]["shards"] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    assert set(manifest["splits"]) == {"train", "val"} and manifest["splits"]["val"]["samples"] == 10

    source = list(ShardDataset(resolve_shards(root / "data", "train")))
    with torch.no_grad():
        expected = tok.model.encode_codes(torch.stack([image_to_pixels(s.image) for s in source])).group_indices
    mirrored = list(wds.WebDataset(str(root / "codes" / "train-{00000..00002}.tar"), shardshuffle=False))
    assert [m["__key__"] for m in mirrored] == [s.key for s in source]
    for m, s, e in zip(mirrored, source, expected):
        codes = np.load(io.BytesIO(m["codes.npy"]))
        assert codes.dtype == np.uint8 and np.array_equal(codes, e.numpy())
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(m["png"]))), np.asarray(s.image))
        assert json.loads(m["json"]) == s.meta

    rows = list(tokenizer_cli.read_precomputed(root / "codes", "train", expected_hash=tok.hash))
    assert [r[0] for r in rows] == [s.key for s in source] and rows[0][2] == source[0].meta
    assert all(np.array_equal(r[1], e.numpy()) for r, e in zip(rows, expected))
    with pytest.raises(UserError, match=f"tokenizer {tok.hash}, expected 0123456789abcdef"):
        tokenizer_cli.read_precomputed(root / "codes", "train", expected_hash="0123456789abcdef")
    with pytest.raises(UserError, match="no split 'test'"):
        tokenizer_cli.read_precomputed(root / "codes", "test")


def test_precompute_with_workers_writes_the_same_bytes(env, capsys, tmp_path):
    root, _ = env
    args = ["precompute", "--tokenizer", root / "export", "--data", root / "data", "--splits", "train,val",
            "--quiet", "--batch-size", "3"]
    assert run(capsys, *args, "--out", tmp_path / "one")[0] == 0
    assert run(capsys, *args, "--out", tmp_path / "two", "--workers", "2")[0] == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) > 3
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    code, _, err = run(capsys, *args, "--out", tmp_path / "zero", "--workers", "0")
    assert code == 2 and "--workers must be >= 1, got 0" in err and not (tmp_path / "zero").exists()


def test_precompute_counts_skipped_samples(env, capsys, tmp_path):
    root, _ = env
    good = list(islice(wds.WebDataset(str(root / "data" / "val-00000.tar"), shardshuffle=False), 2))
    (tmp_path / "data").mkdir()
    with wds.TarWriter(str(tmp_path / "data" / "val-00000.tar")) as sink:
        for sample in good:
            sink.write({k: v for k, v in sample.items() if k in ("__key__", "png", "json")})
        sink.write({"__key__": "broken", "png": b"not a png", "json": b"{}"})
    assert run(capsys, "precompute", "--tokenizer", root / "export", "--data", tmp_path / "data",
               "--splits", "val", "--out", tmp_path / "codes", "--quiet")[0] == 0
    split = json.loads((tmp_path / "codes" / "manifest.json").read_text())["splits"]["val"]
    assert split["samples"] == 2 and split["skipped"] == {"unreadable image": 1}


def test_interrupted_precompute_leaves_nothing(env, capsys, monkeypatch):
    root, _ = env
    real, calls = tokenizer_cli.write_code_shard, []

    def interrupt_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenizer_cli, "write_code_shard", interrupt_on_third_shard)
    assert run(capsys, "precompute", "--tokenizer", root / "export", "--data", root / "data",
               "--out", root / "halfway", "--quiet")[0] == 130
    assert not [p for p in root.iterdir() if "halfway" in p.name]


def test_zero_shot(env, capsys, tmp_path):
    root, images = env
    labels = tmp_path / "labels.txt"
    labels.write_text("# classes\na red circle\na blue square\n\na green cross\n")
    code, stdout, _ = run(capsys, "zero-shot", "--tokenizer", root / "export", *images[:2],
                          "--labels-file", labels, "--top-k", "2")
    assert code == 0 and stdout.count(":\n") == 2
    probs = [float(line.split()[0]) for line in stdout.splitlines() if line.startswith("  ")]
    assert len(probs) == 4 and all(0 <= p <= 1 for p in probs) and probs[0] >= probs[1]
    code, _, err = run(capsys, "zero-shot", "--tokenizer", root / "export_notext", images[0],
                       "--labels", "a red circle", "a blue square")
    assert code == 2 and err.startswith("error:") and "no text tower" in err and "export_notext" in err


def test_zero_shot_breakdown_bench(env, capsys, tmp_path):
    """bench/zero_shot_breakdown.py: its prompt accuracy is the evaluation's zero-shot accuracy."""
    root, _ = env
    bench = runpy.run_path(str(ROOT / "bench" / "zero_shot_breakdown.py"))
    out = tmp_path / "zs.json"
    assert bench["main"](["--tokenizer", str(root / "export"), "--data", str(root / "data"), "--split", "test",
                          "--prototype-images", "20", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    loaded = load_tokenizer(root / "export")
    expected = evaluate_tokenizer(loaded.model, loaded.text_tokenizer, root / "data", split="test", progress=False)
    assert result["images"] == expected["zero_shot_images"]
    assert result["prompt_accuracy"] == pytest.approx(expected["zero_shot_acc"])
    assert 0 <= result["prototype_accuracy"] <= 1 and -1 <= result["prompt_prototype_cosine"] <= 1
    sizes = [row for key, row in result["per_group"].items() if key in ("small", "large")]
    assert sum(row["n"] for row in sizes) == result["images"]
    wrong = round(result["images"] * (1 - result["prompt_accuracy"]))
    assert sum(result["confusions"].values()) == wrong
    capsys.readouterr()
    assert bench["main"](["--tokenizer", str(root / "export_notext"), "--data", str(root / "data")]) == 2
    assert "no text tower" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad inputs: exit 2, one line naming the culprit, no output
# ---------------------------------------------------------------------------------------------

def _write_bad_files(root: Path, good: dict) -> None:
    (root / "not_image.png").write_text("hello")
    Image.new("RGB", (16, 16)).save(root / "small.png")
    (root / "corrupt.json").write_text('{"format": "qlip-codes/1", "tokenizer_hash": "x", "images": [')
    (root / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    out_of_range = {**good, "images": [{**good["images"][0], "group_indices": [[64, 0]] * 64}]}
    (root / "range.json").write_text(json.dumps(out_of_range))
    (root / "otherhash.json").write_text(json.dumps({**good, "tokenizer_hash": "ffffffffffffffff"}))


def test_bad_inputs_exit_2_and_write_nothing(env, capsys):
    root, images = env
    exp, out = root / "export", root / "bad_out"
    run(capsys, "encode", "--tokenizer", exp, images[0], "--out", root / "good.json")
    good = json.loads((root / "good.json").read_text())
    _write_bad_files(root, good)
    cases = [
        (["encode", "--tokenizer", root / "missing_export", images[0], "--out", out / "c.json"], "missing_export"),
        (["encode", "--tokenizer", exp, root / "not_image.png", "--out", out / "c.json"], "not_image.png is not an image"),
        (["encode", "--tokenizer", exp, root / "small.png", "--out", out / "c.json"], "small.png is 16x16.*32x32"),
        (["encode", "--tokenizer", exp, root / "nope.png", "--out", out / "c.json"], "image not found.*nope.png"),
        (["encode", "--tokenizer", exp, images[0], "--out", out / "c.txt"], "c.txt.*.json or .npz"),
        (["reconstruct", "--tokenizer", exp, images[0], root / "small.png", "--out", out], "small.png"),
        (["decode", "--tokenizer", exp, root / "corrupt.json", "--out", out], "corrupt.json: corrupt"),
        (["decode", "--tokenizer", exp, root / "corrupt.npz", "--out", out], "corrupt.npz: corrupt"),
        (["decode", "--tokenizer", exp, root / "range.json", "--out", out], "range.json: group index 64 is out of range"),
        (["decode", "--tokenizer", exp, root / "otherhash.json", "--out", out],
         f"otherhash.json was encoded by tokenizer ffffffffffffffff.*is {good['tokenizer_hash']}"),
        (["decode", "--tokenizer", exp, root / "none.json", "--out", out], "codes file not found.*none.json"),
        (["precompute", "--tokenizer", exp, "--data", root / "no_data", "--out", out], "no_data"),
        (["precompute", "--tokenizer", exp, "--data", root / "data", "--splits", "train,dev", "--out", out],
         "unknown split 'dev'.*available: test, train, val"),
        (["precompute", "--tokenizer", exp, "--data", root / "data", "--out", root / "data"], "not empty.*--overwrite"),
        (["zero-shot", "--tokenizer", exp, images[0], "--labels", "only one"], "at least 2 labels"),
        (["encode", "--tokenizer", exp, "--out", out / "c.json"], "required: IMAGE"),
    ]
    for argv, message in cases:
        code, stdout, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert re.search(message, err), (message, err)
        assert not out.exists(), argv
        assert not [p for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_decode_to_pixels_validates(env):
    root, _ = env
    model = load_tokenizer(root / "export").model
    ok = torch.zeros(1, 64, 2, dtype=torch.int64)
    assert decode_to_pixels(model, ok).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"shape \(B, 64, 2\)"):
        decode_to_pixels(model, torch.zeros(1, 63, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"-1 is out of range.*\[0, 64\)"):
        decode_to_pixels(model, ok - 1)
    with pytest.raises(ValueError, match="must be integers"):
        decode_to_pixels(model, ok.float())
    assert torch.equal(decode_to_pixels(model, ok.numpy().astype(np.uint16)), decode_to_pixels(model, ok))


def test_load_image_converts_modes_and_save_png_round_trips(tmp_path):
    Image.new("L", (32, 32), 200).save(tmp_path / "grey.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    assert torch.allclose(load_image(tmp_path / "grey.png", 32), torch.full((3, 32, 32), 200 / 127.5 - 1))
    pixels = load_image(tmp_path / "rgba.png", 32)
    assert pixels[0].eq(1).all() and pixels[1:].eq(-1).all()
    save_png(pixels, tmp_path / "out" / "red.png")
    assert torch.equal(load_image(tmp_path / "out" / "red.png", 32), pixels)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["red.png"]  # no temporary left
    with pytest.raises(UserError, match="grey.png is 32x32 but the tokenizer takes 64x64"):
        load_image(tmp_path / "grey.png", 64)
