"""Fuzz-style robustness of the data readers: hundreds of generated malformed samples and files.

Readers covered: ``ShardDataset`` (samples and whole tar files), ``read_precomputed`` (manifests and
``codes.npy``) and ``unified_mm.data.mixture`` sequence building (``sample_tasks`` /
``build_sequence`` on malformed metas). Accepted outcomes and the ``outcomes`` fixture are in
``tests/fuzz_env.py``; the cases of this file are checked to cover >= 200 cases (the last test).
The other fuzz files are ``test_fuzz_exports.py`` and ``test_fuzz_inputs.py``.
"""
from __future__ import annotations

import io
import json
import random
import struct
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from fuzz_env import SEED, npy, outcomes  # noqa: F401, F811 -- outcomes is a fixture

IMAGE_SIZE = 16


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------

def image_bytes(size=(IMAGE_SIZE, IMAGE_SIZE), mode="RGB", fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (decompression-bomb sized) with no real data."""
    import zlib
    data = bytearray(image_bytes())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def image_variants(rng: random.Random) -> dict[str, bytes]:
    good = image_bytes()
    out = {
        "empty": b"", "zeros": bytes(100), "text": b"definitely not an image",
        "gif-garbage": b"GIF89a" + bytes(20), "png-magic-only": b"\x89PNG\r\n\x1a\n",
        "bomb": png_with_header_size(60000, 60000), "zero-size-header": png_with_header_size(0, 0),
    }
    for i in range(5):
        out[f"random{i}"] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
    for cut in (8, 20, 33, 50, len(good) - 12, len(good) - 1):
        out[f"truncated{cut}"] = good[:cut]
    corrupt = bytearray(good)
    corrupt[40] ^= 0xFF
    out["bitflip"] = bytes(corrupt)
    for mode in ("1", "L", "LA", "P", "RGBA", "I", "I;16", "F"):
        out[f"mode-{mode}"] = image_bytes(mode=mode, fmt="TIFF" if mode in ("F", "I") else "PNG")
    for mode in ("CMYK", "L"):
        out[f"jpeg-{mode}"] = image_bytes(mode=mode, fmt="JPEG")
    out["webp"] = image_bytes(fmt="WEBP")
    out["gif"] = image_bytes(mode="P", fmt="GIF")
    out["bmp"] = image_bytes(fmt="BMP")
    for size in ((8, 8), (IMAGE_SIZE, 8), (1, 1), (64, 64), (IMAGE_SIZE + 1, IMAGE_SIZE)):
        out[f"size{size[0]}x{size[1]}"] = image_bytes(size=size)
    return out


def json_variants() -> dict[str, bytes]:
    def dumps(obj) -> bytes:
        return json.dumps(obj).encode()

    return {
        "empty": b"", "brace": b"{", "null": b"null", "list": b"[1, 2]", "number": b"123", "string": b'"str"',
        "bom": b"\xef\xbb\xbf{}", "utf16": '{"a": 1}'.encode("utf-16"), "latin1": b'{"c": "\xe9"}',
        "nan": b'{"captions": [NaN]}', "huge-number": b'{"n": 1e999}',
        "deep-list": b"[" * 50000 + b"]" * 50000, "deep-dict": b'{"a":' * 50000 + b"1" + b"}" * 50000,
        "dup-keys": b'{"captions": ["a"], "captions": 5}',
        "captions-empty": dumps({"captions": []}), "captions-blank": dumps({"captions": ["", "  "]}),
        "captions-null": dumps({"captions": None}), "captions-int": dumps({"captions": 5}),
        "captions-str": dumps({"captions": "a red circle"}), "captions-mixed": dumps({"captions": [1, None, {}, []]}),
        "captions-dict": dumps({"captions": {"0": "a"}}),
        "unicode-rtl": dumps({"captions": ["\u202ea red circle\u202c"]}),
        "unicode-zw": dumps({"captions": ["\u200b\u200c\u200d\ufeff"]}),
        "unicode-emoji": dumps({"captions": ["😀" * 300]}),
        "unicode-nul": dumps({"captions": ["a\u0000b"]}),
        "unicode-surrogate": b'{"captions": ["\\ud800 lone surrogate"]}',
        "unicode-combining": dumps({"captions": ["a" + "\u0301" * 500]}),
        "long-caption": dumps({"captions": ["word " * 20000]}),
        "qa-bad": dumps({"qa": [{"question": None, "answer": 3}, "x", {"question": "q?"}]}),
        "objects-bad": dumps({"objects": [{"colour": "red"}, 5], "captions": ["a red circle"]}),
        "valid": dumps({"captions": ["a red circle", "a big red circle"], "qa": [{"question": "q?", "answer": "a"}]}),
    }


def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def read_all(shards: list[str], **kwargs) -> tuple[list, dict]:
    from unified_mm.data.shards import ShardDataset, SkipLog
    skip_log = SkipLog()
    samples = list(ShardDataset(shards, skip_log=skip_log, **kwargs))
    for sample in samples:  # what comes out is usable
        assert isinstance(sample.meta, dict)
        if sample.image is not None:
            assert sample.image.mode == "RGB"
            if kwargs.get("image_size"):
                assert sample.image.size == (kwargs["image_size"],) * 2
    return samples, skip_log.summary()


# ---------------------------------------------------------------------------------------------
# ShardDataset
# ---------------------------------------------------------------------------------------------

def test_shard_samples(tmp_path, outcomes):
    rng = random.Random(SEED)
    good_json = json_variants()["valid"]
    samples = [{"__key__": f"img-{name}", "png": data, "json": good_json} for name, data in image_variants(rng).items()]
    samples += [{"__key__": f"json-{name}", "png": image_bytes(), "json": data} for name, data in json_variants().items()]
    samples += [
        {"__key__": "only-png", "png": image_bytes()}, {"__key__": "only-json", "json": good_json},
        {"__key__": "only-other", "txt": b"hello"}, {"__key__": "extra-parts", "png": image_bytes(), "json": good_json,
                                                    "codes.npy": b"junk", "txt": "é".encode()},
        {"__key__": "jpg-part", "jpg": image_bytes(fmt="JPEG"), "json": good_json},
        {"__key__": "ünïcödé-ключ-🔑", "png": image_bytes(), "json": good_json},
    ]
    skipped_total = read_total = 0
    for index, sample in enumerate(samples):
        shard = write_tar(tmp_path / f"s{index:04d}.tar", [sample])
        for decode_image in (True, False):
            result = outcomes.run("ShardDataset sample", f"{sample['__key__']}/decode={decode_image}",
                                  lambda: read_all([str(shard)], image_size=IMAGE_SIZE, decode_image=decode_image))
            if result is not None and decode_image:
                read_total += len(result[0])
                skipped_total += sum(result[1].values())
    # all of them in one shuffled, repeated stream too
    shard = write_tar(tmp_path / "all.tar", samples)
    result = outcomes.run("ShardDataset sample", "all-in-one", lambda: read_all([str(shard)], image_size=IMAGE_SIZE,
                                                                                shuffle_buffer=7))
    outcomes.assert_clean()
    assert result is not None
    assert skipped_total > 30 and read_total > 10, (skipped_total, read_total)
    outcomes.assert_clean()


def test_shard_files(tmp_path, outcomes):
    rng = random.Random(SEED + 1)
    good = [{"__key__": f"k{i}", "png": image_bytes(), "json": json_variants()["valid"]} for i in range(4)]
    intact = write_tar(tmp_path / "intact.tar", good).read_bytes()
    files: dict[str, bytes] = {"empty": b"", "not-a-tar": b"hello world" * 100, "zeros": bytes(4096),
                               "garbage-after": intact + b"garbage" * 10,
                               "gzip-garbage": b"\x1f\x8b\x08" + bytes(600)}
    for i in range(12):
        files[f"cut{i}"] = intact[:rng.randint(1, len(intact) - 1)]
    for i in range(4):
        flipped = bytearray(intact)
        for _ in range(20):
            flipped[rng.randrange(len(flipped))] = rng.getrandbits(8)
        files[f"flipped{i}"] = bytes(flipped)
    for i in range(3):
        files[f"random{i}"] = bytes(rng.getrandbits(8) for _ in range(512 * (i + 1)))
    paths = {name: tmp_path / f"{name}.tar" for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    paths["odd-members"] = raw_tar(tmp_path / "odd.tar", [("../escape.png", image_bytes()), ("/abs.json", b"{}"),
                                                          ("noext", b"x"), (".hidden.png", image_bytes()),
                                                          ("a.b.c.png", image_bytes()), ("a.b.c.json", b"{}")])
    paths["directory"] = tmp_path / "a_directory.tar"
    paths["directory"].mkdir()
    for name, path in paths.items():
        outcomes.run("ShardDataset file", name, lambda: read_all([str(path)], image_size=IMAGE_SIZE))
    outcomes.run("ShardDataset file", "missing", lambda: read_all([str(tmp_path / "missing.tar")]))
    outcomes.run("ShardDataset file", "mixed", lambda: read_all([str(p) for p in paths.values()], repeat=False))
    outcomes.assert_clean()


# ---------------------------------------------------------------------------------------------
# read_precomputed
# ---------------------------------------------------------------------------------------------

def test_read_precomputed(tmp_path, outcomes):
    from unified_mm.tokenizer_cli import PRECOMPUTED_FORMAT, read_precomputed

    grid, groups = 2, 2
    good_codes = npy(np.zeros((grid * grid, groups), np.uint8))
    meta = json_variants()["valid"]
    code_variants = {
        "ok": good_codes, "missing": None, "empty": b"", "garbage": b"\x93NUMPY garbage", "text": b"1 2 3",
        "pickled-object": npy(np.array([{"a": 1}, None], dtype=object)), "float": npy(np.zeros((4, 2), np.float32)),
        "wrong-shape": npy(np.zeros((3, 2), np.uint8)), "0d": npy(np.int64(3)), "1d": npy(np.zeros(8, np.uint8)),
        "3d": npy(np.zeros((4, 2, 1), np.uint8)), "bool": npy(np.zeros((4, 2), bool)),
        "complex": npy(np.zeros((4, 2), np.complex64)), "strings": npy(np.array([["a", "b"]] * 4)),
        "negative": npy(-np.ones((4, 2), np.int64)), "truncated": good_codes[:-3],
        "header-lies": good_codes.replace(b"(4, 2)", b"(400000, 2)"),
        "fortran": npy(np.asfortranarray(np.zeros((4, 2), np.int32))), "big-endian": npy(np.zeros((4, 2), ">i4")),
    }
    samples = []
    for name, codes in code_variants.items():
        sample = {"__key__": f"c-{name}", "json": meta}
        if codes is not None:
            sample["codes.npy"] = codes
        samples.append(sample)

    def manifest(**overrides):
        base = {"format": PRECOMPUTED_FORMAT, "tokenizer_hash": "abc", "grid_size": grid, "num_groups": groups,
                "num_bits": 4, "group_size": 2, "splits": {"train": {"shards": ["train-00000.tar"], "samples": 1}}}
        base.update(overrides)
        return base

    def codes_dir(name: str, manifest_obj: Any, shard_samples=None, raw_manifest: bytes | None = None) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        if shard_samples is not None:
            write_tar(directory / "train-00000.tar", shard_samples)
        if raw_manifest is not None:
            (directory / "manifest.json").write_bytes(raw_manifest)
        elif manifest_obj is not None:
            (directory / "manifest.json").write_text(json.dumps(manifest_obj))
        return directory

    def consume(directory: Path, expected_hash="abc"):
        return [key for key, codes, _ in read_precomputed(directory, "train", expected_hash)]

    for index, sample in enumerate(samples):  # each malformed codes.npy alone
        directory = codes_dir(f"sample{index}", manifest(), [sample])
        keys = outcomes.run("read_precomputed sample", sample["__key__"], lambda: consume(directory))
        if sample["__key__"] in ("c-ok", "c-negative", "c-fortran", "c-big-endian"):
            assert keys == [sample["__key__"]], (sample["__key__"], keys)
        elif keys is not None:
            assert keys == [], (sample["__key__"], keys)
    manifests = {
        "missing": None, "garbage": b"{not json", "deep": b"[" * 50000 + b"]" * 50000, "list": [],
        "wrong-format": manifest(format="x"),
        "no-splits": {k: v for k, v in manifest().items() if k != "splits"}, "splits-list": manifest(splits=[1]),
        "split-missing": manifest(splits={"val": {"shards": []}}), "split-not-dict": manifest(splits={"train": 5}),
        "shards-not-list": manifest(splits={"train": {"shards": "train-00000.tar"}}),
        "shards-empty": manifest(splits={"train": {"shards": []}}),
        "shard-int": manifest(splits={"train": {"shards": [5]}}),
        "shard-escape": manifest(splits={"train": {"shards": ["../outside.tar"]}}),
        "shard-absolute": manifest(splits={"train": {"shards": ["/etc/passwd"]}}),
        "shard-missing": manifest(splits={"train": {"shards": ["train-00042.tar"]}}),
        "no-grid": {k: v for k, v in manifest().items() if k != "grid_size"}, "grid-str": manifest(grid_size="2"),
        "grid-negative": manifest(grid_size=-2), "groups-float": manifest(num_groups=2.5),
        "hash-mismatch": manifest(tokenizer_hash="other"), "hash-missing": {k: v for k, v in manifest().items()
                                                                            if k != "tokenizer_hash"},
    }
    (tmp_path / "outside.tar").write_bytes(write_tar(tmp_path / "tmp.tar", samples[:1]).read_bytes())
    for name, value in manifests.items():
        raw = value if isinstance(value, bytes) else None
        directory = codes_dir(f"manifest-{name}", None if raw else value, samples[:1], raw)
        keys = outcomes.run("read_precomputed manifest", name, lambda: consume(directory))
        if name in ("shard-escape", "shard-absolute"):
            assert keys is None, f"{name}: a shard outside the codes directory was read"
    outcomes.assert_clean()


# ---------------------------------------------------------------------------------------------
# Sequence building from malformed metas
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    from mmcore.text_tokenizer import TextTokenizer, train_sentencepiece
    from unified_mm.sequence import SequenceBuilder
    from unified_mm.vocab import Vocab
    root = tmp_path_factory.mktemp("fuzz_text")
    corpus = ["a red circle", "what colour is it", "how many shapes", "yes no left right"] * 20
    text = TextTokenizer(train_sentencepiece(corpus, root / "text.model", vocab_size=320))
    vocab = Vocab.for_tokenizers(text.vocab_size, 4, 2, 2)
    return SequenceBuilder(text, vocab, 64), np.zeros((4, 2), np.int64)


def test_sequence_building(builder, outcomes):
    from unified_mm.data.mixture import MixtureConfig, build_sequence, sample_tasks
    from unified_mm.sequence import TASKS
    seq_builder, codes = builder
    cfg = MixtureConfig()
    turn = lambda role, text: {"role": role, "text": text}  # noqa: E731
    metas: dict[str, Any] = {
        "empty": {}, "qa-list-str": {"qa": ["q", "a"]}, "qa-dict": {"qa": {"question": "q"}},
        "qa-none-fields": {"qa": [{"question": None, "answer": None}]},
        "qa-number-answer": {"qa": [{"question": "how many?", "answer": 3}]},
        "qa-empty-answer": {"qa": [{"question": "q?", "answer": ""}]},
        "qa-nested": {"qa": [{"question": {"x": 1}, "answer": ["y"]}]},
        "qa-unicode": {"qa": [{"question": "\u202e?\u0000", "answer": "😀" * 200}]},
        "qa-long": {"qa": [{"question": "word " * 2000, "answer": "yes"}]},
        "captions-int": {"captions": 5}, "captions-mixed": {"captions": [None, 3, "", " ", "ok"]},
        "captions-blank": {"captions": ["   "]}, "captions-long": {"captions": ["red " * 5000]},
        "captions-zw": {"captions": ["\u200b\u200d"]},  # (unpaired surrogates never get here: ShardDataset skips them)
        "conv-empty": {"conversations": []}, "conv-ints": {"conversations": [1, 2]},
        "conv-str": {"conversations": "hello"}, "conv-missing-role": {"conversations": [{"text": "hi"}]},
        "conv-missing-text": {"conversations": [{"role": "user"}]},
        "conv-bad-role": {"conversations": [turn("system", "x"), turn("assistant", "y")]},
        "conv-not-alternating": {"conversations": [turn("user", "a"), turn("user", "b")]},
        "conv-ends-user": {"conversations": [turn("user", "a")]},
        "conv-text-int": {"conversations": [turn("user", 5), turn("assistant", 6)]},
        "conv-empty-answer": {"conversations": [turn("user", "q"), turn("assistant", "")]},
        "conv-image-turn-str": {"conversations": [turn("user", "q"), turn("assistant", "a")], "image_turn": "0"},
        "conv-image-turn-far": {"conversations": [turn("user", "q"), turn("assistant", "a")], "image_turn": 99},
        "conv-ok": {"conversations": [turn("user", "q"), turn("assistant", "a")]},
        "conv-long": {"conversations": [turn("user", "q " * 3000), turn("assistant", "a")]},
        "everything-wrong": {"qa": 1, "captions": {}, "conversations": None, "image_turn": []},
    }
    bad_codes = {"wrong-shape": np.zeros((3, 2), np.int64), "out-of-range": np.full((4, 2), 99, np.int64),
                 "negative": -np.ones((4, 2), np.int64), "float": np.zeros((4, 2), np.float32)}
    for name, meta in metas.items():
        tasks = outcomes.run("sample_tasks", name, lambda: sample_tasks(meta))
        for task in sorted(tasks or ()):
            rng = random.Random(SEED)
            outcomes.run("build_sequence", f"{name}/{task}",
                         lambda: build_sequence(task, codes, meta, rng, cfg, seq_builder))
    good = {"captions": ["a red circle"], "qa": [{"question": "what colour?", "answer": "red"}]}
    for name, bad in bad_codes.items():
        for task in TASKS:
            outcomes.run("build_sequence", f"codes-{name}/{task}",
                         lambda: build_sequence(task, bad, good, random.Random(SEED), cfg, seq_builder))
    outcomes.run("build_sequence", "unknown-task", lambda: build_sequence("ocr", codes, good, random.Random(0), cfg,
                                                                          seq_builder))
    outcomes.assert_clean()


def test_fuzz_covered_enough_cases(outcomes):
    """Runs last in this file: the cases above add up to >= 200, with no unexpected exception."""
    if outcomes.total < 200:
        pytest.skip(f"only {outcomes.total} cases ran (run the whole file)")
    assert outcomes.total >= 200 and not getattr(outcomes, "failed_total", 0) and not outcomes.failures
