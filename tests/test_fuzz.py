"""Fuzz-style robustness: hundreds of generated malformed samples and files through every reader.

Each case goes through one reader or loader; the accepted outcomes are "read" (possibly with
samples skipped and counted by reason) or one of the documented clear errors: :class:`UserError`
or :class:`ValueError` with a non-empty message. Anything else (TypeError, KeyError,
RecursionError, a crash deep in PIL/numpy/safetensors, a hang) fails the test with the case named.
The outcome counts are printed (``pytest -s``) and checked to cover >= 200 cases.

Readers covered: ``ShardDataset`` (samples and whole tar files), ``read_precomputed`` (manifests and
``codes.npy``), ``unified_mm.data.mixture`` sequence building (``sample_tasks`` /
``build_sequence`` on malformed metas), ``tokenizer.export.load_tokenizer``,
``unified_mm.export.load_unified``, ``tokenizer.images.read_codes_file``, the LLaVA/COCO converters
and the ``eval.formats`` readers.
"""
from __future__ import annotations

import collections
import io
import json
import random
import shutil
import struct
import tarfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmcore.errors import UserError

SEED = 1234
IMAGE_SIZE = 16


class Outcomes:
    """Runs cases and counts what happened; unexpected exceptions are collected as failures."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.by_reader: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.ok_cases: list[str] = []

    def run(self, reader: str, name: str, fn: Callable[[], Any]) -> Any:
        self.by_reader[reader] += 1
        try:
            result = fn()
        except UnicodeDecodeError as err:  # a ValueError, but not a clear one: it does not name the file
            self.failures.append(f"{reader}/{name}: bare UnicodeDecodeError: {err}")
            return None
        except (UserError, ValueError) as err:
            message = str(err).strip()
            if not message:
                self.failures.append(f"{reader}/{name}: {type(err).__name__} without a message")
            if "Traceback" in message or "\n" in message.strip():
                self.failures.append(f"{reader}/{name}: multi-line message: {message[:300]!r}")
            self.counts[f"{reader}: {type(err).__name__}"] += 1
            return None
        except Exception as err:  # noqa: BLE001 -- exactly what the fuzz test looks for
            self.failures.append(f"{reader}/{name}: {type(err).__name__}: {str(err)[:300]}")
            return None
        self.counts[f"{reader}: ok"] += 1
        self.ok_cases.append(f"{reader}/{name}")
        return result

    @property
    def total(self) -> int:
        return sum(self.by_reader.values())

    def assert_clean(self) -> None:
        """Fail with the unexpected exceptions collected so far (and forget them)."""
        failures, self.failures = self.failures, []
        self.failed_total = getattr(self, "failed_total", 0) + len(failures)
        assert not failures, f"{len(failures)} unexpected exceptions:\n" + "\n".join(failures)


@pytest.fixture(scope="module")
def outcomes(request):
    out = Outcomes()
    yield out
    print(f"\nfuzz: {out.total} cases")
    for key, count in sorted(out.counts.items()):
        print(f"  {key:55s} {count}")


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

def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


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


# ---------------------------------------------------------------------------------------------
# Export directories and codes files
# ---------------------------------------------------------------------------------------------

QLIP_SMALL = {"encoder": {"width": 32, "depth": 1, "heads": 2}, "decoder": {"width": 32, "depth": 1, "heads": 2},
              "text": {"width": 32, "depth": 1, "heads": 2}, "embed_dim": 32}
LLAMA_SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
               "intermediate_size": 64}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from mmcore.text_tokenizer import TextTokenizer, train_sentencepiece
    from tokenizer.export import save_tokenizer
    from tokenizer.qlip import QLIP, preset_config
    from unified_mm.export import save_unified
    from unified_mm.model import UnifiedModelConfig, build_model
    from unified_mm.vocab import Vocab
    root = tmp_path_factory.mktemp("fuzz_exports")
    torch.manual_seed(0)
    text_path = train_sentencepiece(["a red circle", "a blue square", "how many", "two"] * 20, root / "text.model",
                                    vocab_size=320)
    text = TextTokenizer(text_path)
    config = preset_config("tiny", QLIP_SMALL)
    qlip = save_tokenizer(QLIP(config), root / "qlip", text_tokenizer_path=text_path)
    grid = config.encoder.image_size // config.encoder.patch_size
    vocab = Vocab.for_tokenizers(text.vocab_size, config.bsq.num_bits, config.bsq.group_size, grid)
    model = build_model(UnifiedModelConfig(overrides=LLAMA_SMALL), vocab, text_pieces=text.n_text)
    unified = save_unified(model, vocab, root / "unified", text_tokenizer_path=text_path, tokenizer_dir=qlip)
    return {"qlip": Path(qlip), "unified": Path(unified), "root": root}


def safetensors_variants(good: bytes, rng: random.Random) -> dict[str, bytes]:
    header_len = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8: 8 + header_len])
    first = next(k for k in header if k != "__metadata__")

    def with_header(new_header: dict, body: bytes | None = None) -> bytes:
        raw = json.dumps(new_header).encode()
        return struct.pack("<Q", len(raw)) + raw + (good[8 + header_len:] if body is None else body)

    lied = dict(header)
    lied[first] = {**header[first], "data_offsets": [0, 10 ** 12]}
    wrong_dtype = dict(header)
    wrong_dtype[first] = {**header[first], "dtype": "Q9"}
    wrong_shape = dict(header)
    wrong_shape[first] = {**header[first], "shape": [1, 2, 3]}
    renamed = {("x" + k if k == first else k): v for k, v in header.items()}
    dropped = {k: v for k, v in header.items() if k != first}
    out = {"empty": b"", "tiny": b"\x01", "random": bytes(rng.getrandbits(8) for _ in range(300)),
           "truncated-header": good[: 8 + header_len // 2], "truncated-body": good[: len(good) // 2],
           "huge-header-len": struct.pack("<Q", 2 ** 62) + good[8:], "header-not-json": struct.pack("<Q", 5) + b"{{{{{",
           "header-list": with_header([]), "offsets-lie": with_header(lied), "bad-dtype": with_header(wrong_dtype),
           "bad-shape": with_header(wrong_shape), "renamed-key": with_header(renamed), "missing-key": with_header(dropped),
           "pickle": b"\x80\x02}q\x00."}
    return out


def test_load_tokenizer(exports, tmp_path, outcomes):
    from tokenizer.export import load_tokenizer
    rng = random.Random(SEED + 2)
    source = exports["qlip"]
    config = json.loads((source / "config.json").read_text())

    def variant(name: str, mutate: Callable[[Path], None]) -> None:
        directory = tmp_path / f"qlip-{name}"
        shutil.copytree(source, directory)
        mutate(directory)
        outcomes.run("load_tokenizer", name, lambda: load_tokenizer(directory))

    def set_config(**qlip_overrides) -> Callable[[Path], None]:
        def mutate(directory: Path) -> None:
            header = json.loads(json.dumps(config))
            for dotted, value in qlip_overrides.items():
                node = header["qlip"]
                parts = dotted.split("__")
                for part in parts[:-1]:
                    node = node[part]
                node[parts[-1]] = value
            (directory / "config.json").write_text(json.dumps(header))
        return mutate

    variant("intact", lambda d: None)
    variant("no-config", lambda d: (d / "config.json").unlink())
    variant("no-weights", lambda d: (d / "model.safetensors").unlink())
    variant("no-text-model", lambda d: (d / "text_tokenizer.model").unlink())
    variant("text-model-garbage", lambda d: (d / "text_tokenizer.model").write_bytes(b"garbage" * 10))
    variant("text-model-empty", lambda d: (d / "text_tokenizer.model").write_bytes(b""))
    variant("config-garbage", lambda d: (d / "config.json").write_bytes(b"\xff\xfe{"))
    variant("config-deep", lambda d: (d / "config.json").write_bytes(b"[" * 50000 + b"]" * 50000))
    variant("config-list", lambda d: (d / "config.json").write_text("[]"))
    variant("config-wrong-format", lambda d: (d / "config.json").write_text(json.dumps({**config, "format": "x"})))
    variant("config-no-qlip", lambda d: (d / "config.json").write_text(json.dumps({"format": config["format"]})))
    variant("config-qlip-list", lambda d: (d / "config.json").write_text(json.dumps({**config, "qlip": [1]})))
    variant("config-unknown-key", set_config(bogus=1))
    for field, value in (("encoder__width", 0), ("encoder__width", -32), ("encoder__width", 33),
                         ("encoder__heads", 0), ("encoder__heads", 3), ("encoder__depth", -1),
                         ("encoder__width", "32"), ("encoder__width", 1.5), ("encoder__image_size", 0),
                         ("encoder__patch_size", 0), ("encoder__patch_size", 5), ("encoder__patch_size", 10 ** 9),
                         ("bsq__num_bits", 0), ("bsq__group_size", 5), ("bsq__group_size", 0),
                         ("text__vocab_size", 0), ("text__context_length", -1), ("embed_dim", 31),
                         ("encoder", None), ("text", "none"), ("decoder__width", 64)):
        variant(f"config-{field}={value!r}", set_config(**{field: value}))
    for name, data in safetensors_variants((source / "model.safetensors").read_bytes(), rng).items():
        variant(f"weights-{name}", lambda d, data=data: (d / "model.safetensors").write_bytes(data))
    outcomes.run("load_tokenizer", "missing-dir", lambda: load_tokenizer(tmp_path / "nope"))
    outcomes.run("load_tokenizer", "file-not-dir", lambda: load_tokenizer(source / "config.json"))
    assert outcomes.by_reader["load_tokenizer"] >= 45
    assert outcomes.counts["load_tokenizer: ok"] == 1  # only the intact copy loads
    outcomes.assert_clean()


def test_load_unified(exports, tmp_path, outcomes):
    from unified_mm.export import load_unified
    rng = random.Random(SEED + 3)
    source = exports["unified"]
    header = json.loads((source / "unified_mm.json").read_text())
    llama = json.loads((source / "config.json").read_text())

    def variant(name: str, mutate: Callable[[Path], None]) -> None:
        directory = tmp_path / f"unified-{name}"
        shutil.copytree(source, directory)
        mutate(directory)
        outcomes.run("load_unified", name, lambda: load_unified(directory))

    def write(file: str, obj: Any) -> Callable[[Path], None]:
        return lambda d: (d / file).write_text(json.dumps(obj))

    def header_with(dotted: str, value: Any) -> dict:
        new = json.loads(json.dumps(header))
        node = new
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        if value is KeyError:
            node.pop(parts[-1])
        else:
            node[parts[-1]] = value
        return new

    variant("intact", lambda d: None)
    for file in ("unified_mm.json", "config.json", "model.safetensors", "tokenizer.model"):
        variant(f"no-{file}", lambda d, file=file: (d / file).unlink())
    variant("no-qlip", lambda d: shutil.rmtree(d / "qlip"))
    variant("qlip-weights-changed", lambda d: (d / "qlip" / "model.safetensors").write_bytes(
        (exports["qlip"] / "model.safetensors").read_bytes()[:-4] + b"\x00\x00\x80\x3f"))
    variant("header-garbage", lambda d: (d / "unified_mm.json").write_bytes(b"{\xff"))
    variant("header-list", write("unified_mm.json", [header]))
    variant("header-deep", lambda d: (d / "unified_mm.json").write_bytes(b"{\"a\":" * 50000 + b"1" + b"}" * 50000))
    variant("config-deep", lambda d: (d / "config.json").write_bytes(b"[" * 50000 + b"]" * 50000))
    for dotted, value in (("format", "unified-mm/999"), ("tokenizer.dir", "../qlip"), ("tokenizer.dir", "/etc"),
                          ("tokenizer.dir", ".."), ("tokenizer.dir", ""), ("tokenizer.dir", 5), ("tokenizer.dir", KeyError),
                          ("tokenizer.hash", "0" * 16), ("tokenizer.hash", None), ("text_tokenizer.file", "../text.model"),
                          ("text_tokenizer.file", "/etc/passwd"), ("text_tokenizer.file", "config.json"),
                          ("text_tokenizer.fingerprint", "x"), ("text_tokenizer.vocab_size", "100"),
                          ("text_tokenizer.vocab_size", True), ("vocab", []), ("vocab", {}),
                          ("vocab.text_vocab_size", -1), ("vocab.num_bits", 0), ("vocab.grid_size", 10 ** 6),
                          ("sampler_defaults", []), ("sampler_defaults", {"top_p": 0}),
                          ("sampler_defaults", {"temperature": float("nan")}), ("sampler_defaults", {"bogus": 1}),
                          ("metadata", [1]), ("templates_version", None)):
        variant(f"header-{dotted}={value!r}", write("unified_mm.json", header_with(dotted, value)))
    for key, value in (("model_type", "gpt2"), ("vocab_size", 5), ("hidden_size", 31), ("num_attention_heads", 0),
                       ("num_hidden_layers", -1), ("pad_token_id", 10 ** 6), ("hidden_size", "32"),
                       ("intermediate_size", None), ("rope_theta", "x")):
        variant(f"config-{key}={value!r}", write("config.json", {**llama, key: value}))
    variant("config-garbage", lambda d: (d / "config.json").write_text("{"))
    variant("config-list", write("config.json", [llama]))
    for name, data in safetensors_variants((source / "model.safetensors").read_bytes(), rng).items():
        variant(f"weights-{name}", lambda d, data=data: (d / "model.safetensors").write_bytes(data))
    outcomes.run("load_unified", "missing-dir", lambda: load_unified(tmp_path / "nope"))
    assert outcomes.counts["load_unified: ok"] <= 4, outcomes.counts  # intact (+ harmless header edits)
    outcomes.assert_clean()


def test_read_codes_file(tmp_path, outcomes):
    from tokenizer.images import read_codes_file
    header = {"format": "qlip-codes/1", "tokenizer_hash": "abc"}
    cases: dict[str, tuple[str, bytes]] = {
        "json-garbage": ("json", b"{"), "json-list": ("json", b"[]"), "json-empty": ("json", b""),
        "json-no-codes": ("json", json.dumps({"header": header}).encode()),
        "json-bad-codes": ("json", json.dumps({"header": header, "sources": ["a"], "group_indices": "x"}).encode()),
        "json-ragged": ("json", json.dumps({"header": header, "sources": ["a"], "group_indices": [[1], [1, 2]]}).encode()),
        "npz-garbage": ("npz", b"PK\x03\x04garbage"), "npz-empty": ("npz", b""), "npy-as-npz": ("npz", npy(np.zeros(3))),
        "unknown-ext": ("txt", b"hello"),
    }
    for name, (ext, data) in cases.items():
        path = tmp_path / f"{name}.{ext}"
        path.write_bytes(data)
        outcomes.run("read_codes_file", name, lambda: read_codes_file(path))
    outcomes.run("read_codes_file", "missing", lambda: read_codes_file(tmp_path / "missing.json"))
    outcomes.assert_clean()


# ---------------------------------------------------------------------------------------------
# Converters and eval formats
# ---------------------------------------------------------------------------------------------

def test_converters(tmp_path, outcomes):
    from unified_mm.data.converters import ConvertOptions, convert_coco, convert_llava
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(images / "ok.png")
    (images / "fake.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    options = ConvertOptions(image_size=16, shard_size=4, progress=False)
    qa = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]
    llava_cases: dict[str, Any] = {
        "top-dict": {"a": 1}, "top-int": 5, "empty-list": [], "records-int": [1, 2, 3],
        "record-no-conv": [{"id": 1, "image": "ok.png"}], "conv-str": [{"id": 1, "image": "ok.png", "conversations": "x"}],
        "conv-turn-int": [{"id": 1, "image": "ok.png", "conversations": [1]}],
        "turn-no-value": [{"id": 1, "image": "ok.png", "conversations": [{"from": "human"}]}],
        "turn-value-int": [{"id": 1, "image": "ok.png", "conversations": [{"from": "human", "value": 5}]}],
        "image-int": [{"id": 1, "image": 5, "conversations": qa}],
        "image-list": [{"id": 1, "image": ["ok.png"], "conversations": qa}],
        "escape-dotdot": [{"id": 1, "image": "../outside.png", "conversations": qa}],
        "escape-abs": [{"id": 1, "image": str(tmp_path / "outside.png"), "conversations": qa}],
        "escape-symlink": [{"id": 1, "image": "link.png", "conversations": qa}],
        "escape-drive": [{"id": 1, "image": "C:\\x.png", "conversations": qa}],
        "nul-in-path": [{"id": 1, "image": "ok\u0000.png", "conversations": qa}],
        "fake-image": [{"id": 1, "image": "fake.png", "conversations": qa}],
        "id-dict": [{"id": {"x": 1}, "image": "ok.png", "conversations": qa}],
        "unicode": [{"id": "ü", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\n\u202e😀"},
                                                                    {"from": "gpt", "value": "\u0000"}]}],
        "good": [{"id": 1, "image": "ok.png", "conversations": qa}],
    }
    coco_cases: dict[str, Any] = {
        "top-list": [], "no-images": {"annotations": []}, "images-str": {"images": "x", "annotations": []},
        "image-no-file": {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a"}]},
        "caption-int": {"images": [{"id": 1, "file_name": "ok.png"}], "annotations": [{"image_id": 1, "caption": 5}]},
        "caption-empty": {"images": [{"id": 1, "file_name": "ok.png"}], "annotations": [{"image_id": 1, "caption": " "}]},
        "ann-unknown-image": {"images": [{"id": 1, "file_name": "ok.png"}],
                              "annotations": [{"image_id": 2, "caption": "a"}]},
        "file-escape": {"images": [{"id": 1, "file_name": "../outside.png"}],
                        "annotations": [{"image_id": 1, "caption": "a"}]},
        "dup-ids": {"images": [{"id": 1, "file_name": "ok.png"}] * 2, "annotations": [{"image_id": 1, "caption": "a"}]},
        "annotations-dict": {"images": [{"id": 1, "file_name": "ok.png"}], "annotations": {"image_id": 1}},
        "good": {"images": [{"id": 1, "file_name": "ok.png"}], "annotations": [{"image_id": 1, "caption": "a red one"}]},
    }
    for fmt, cases, convert in (("llava", llava_cases, convert_llava), ("coco", coco_cases, convert_coco)):
        for index, (name, data) in enumerate(cases.items()):
            path = tmp_path / f"{fmt}-{index}.json"
            path.write_text(json.dumps(data))
            out = tmp_path / f"out-{fmt}-{index}"
            result = outcomes.run(f"convert_{fmt}", name, lambda: convert(path, images, out, options))
            if name.startswith(("escape", "file-escape")):
                assert result is None or result.written == 0, f"{fmt}/{name} converted an image outside the root"
        for name, data in (("garbage", b"\xff{["), ("deep", b"[" * 50000 + b"]" * 50000)):
            garbage = tmp_path / f"{fmt}-{name}.json"
            garbage.write_bytes(data)
            outcomes.run(f"convert_{fmt}", name, lambda: convert(garbage, images, tmp_path / f"g-{fmt}", options))
    # --add-split onto a dataset whose manifest lists shards outside it
    good = tmp_path / "llava-good.json"
    good.write_text(json.dumps(llava_cases["good"]))
    out = tmp_path / "dataset"
    convert_llava(good, images, out, options)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, shards in (("escape", ["../outside.png"]), ("absolute", [str(tmp_path / "outside.png")]),
                         ("not-list", "x"), ("int", [5])):
        broken = tmp_path / f"dataset-{name}"
        shutil.copytree(out, broken)
        bad = json.loads(json.dumps(manifest))
        bad["splits"]["extra"] = {"samples": 1, "shards": shards}
        (broken / "manifest.json").write_text(json.dumps(bad))
        result = outcomes.run("convert_llava", f"add-split-{name}", lambda: convert_llava(
            good, images, broken, options._replace(split="val", add_split=True)))
        assert result is None, f"add-split with manifest shards {shards!r} was accepted"
    outcomes.assert_clean()


def test_eval_formats(tmp_path, outcomes):
    from eval import formats
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    (tmp_path / "secret.png").write_bytes(b"x")
    values: dict[str, bytes] = {
        "garbage": b"{[", "not-utf8": b"\xff\xfe\x00", "empty": b"", "list": b"[]", "obj": b"{}", "null": b"null",
        "deep": b"[" * 50000 + b"]" * 50000,
    }
    structured = {
        "vqa-questions-str": {"questions": "x"}, "vqa-question-bad": {"questions": [{"question_id": 1.5}]},
        "vqa-question-dup": {"questions": [{"question_id": 1, "image_id": 1, "question": "q"}] * 2},
        "vqa-question-types": {"questions": [{"question_id": [1], "image_id": "x", "question": 5}]},
        "coco-images-dict": {"images": {}, "annotations": []},
        "coco-ann-unknown": {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 9, "caption": "x"}]},
        "coco-caption-int": {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": 3}]},
        "llava-escape": [{"id": 1, "image": "../secret.png", "conversations": [{"from": "human", "value": "q"}]}],
        "llava-abs": [{"id": 1, "image": str(tmp_path / "secret.png"), "conversations": [{"from": "human", "value": "q"}]}],
        "llava-bad-from": [{"id": 1, "image": "a.png", "conversations": [{"from": "system", "value": "q"}]}],
        "llava-conv-empty": [{"id": 1, "image": "a.png", "conversations": []}],
        "llava-image-list-int": [{"id": 1, "image": [1], "conversations": [{"from": "human", "value": "q"}]}],
    }
    jsonl = {
        "geneval-empty": b"", "geneval-garbage-line": b'{"prompt": "x"\n', "geneval-list-line": b"[]\n",
        "geneval-unknown-field": json.dumps({"prompt": "a", "include": [{"class": "circle", "bogus": 1}]}).encode(),
        "geneval-no-include": json.dumps({"prompt": "a", "include": []}).encode(),
        "geneval-bad-count": json.dumps({"prompt": "a", "include": [{"class": "circle", "count": -1}]}).encode(),
        "geneval-bad-position": json.dumps({"prompt": "a", "include": [{"class": "c", "position": [1, 2, 3]}]}).encode(),
        "questions-escape": json.dumps({"question_id": 1, "image": "../secret.png", "text": "q"}).encode(),
        "questions-dup": (json.dumps({"question_id": 1, "text": "q"}) + "\n"
                          + json.dumps({"question_id": 1, "text": "q"})).encode(),
        "answers-missing-fields": json.dumps({"question_id": 1}).encode(),
        "answers-metadata-list": json.dumps({"question_id": 1, "prompt": "p", "text": "t", "answer_id": "a",
                                             "model_id": "m", "metadata": []}).encode(),
        "answers-torn": b'{"question_id": 1, "pro',
    }
    readers = {
        "read_vqav2": lambda p: formats.read_vqav2(p), "read_coco_captions": formats.read_coco_captions,
        "read_llava_json": lambda p: formats.read_llava_json(p, images),
    }
    for reader_name, reader in readers.items():
        for name, data in values.items():
            path = tmp_path / f"{reader_name}-{name}.json"
            path.write_bytes(data)
            outcomes.run(f"eval.{reader_name}", name, lambda: reader(path))
    for name, obj in structured.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(obj))
        prefix = name.split("-")[0]
        reader_name = {"vqa": "read_vqav2", "coco": "read_coco_captions", "llava": "read_llava_json"}[prefix]
        result = outcomes.run(f"eval.{reader_name}", name, lambda: readers[reader_name](path))
        if "escape" in name or "abs" in name:
            assert result is None, f"{name}: a path outside the image folder was accepted"
    for name, data in {**jsonl, **{f"raw-{k}": v for k, v in values.items()}}.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        for reader_name, reader in (("read_geneval_jsonl", formats.read_geneval_jsonl),
                                    ("read_llava_questions", lambda p: formats.read_llava_questions(p, images)),
                                    ("read_answer_file", formats.read_answer_file)):
            result = outcomes.run(f"eval.{reader_name}", name, lambda: reader(path))
            if name == "questions-escape" and reader_name == "read_llava_questions":
                assert result is None, "a question image outside the image folder was accepted"
    outcomes.run("eval.read_vqav2", "missing", lambda: formats.read_vqav2(tmp_path / "missing.json"))
    outcomes.assert_clean()


def test_fuzz_covered_enough_cases(outcomes):
    """Runs last in this file: the cases above add up to >= 200, with no unexpected exception."""
    if outcomes.total < 200:
        pytest.skip(f"only {outcomes.total} cases ran (run the whole file)")
    assert outcomes.total >= 200 and not getattr(outcomes, "failed_total", 0) and not outcomes.failures
