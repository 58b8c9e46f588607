"""Fuzz-style robustness of the export loaders and codes files: mutated copies of real exports.

Readers covered: ``tokenizer.export.load_tokenizer``, ``unified_mm.export.load_unified`` (config,
header and safetensors variants of a tiny real export) and ``tokenizer.images.read_codes_file``.
Accepted outcomes and the ``outcomes`` fixture are in ``tests/fuzz_env.py``.
"""
from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from fuzz_env import SEED, npy, outcomes, run_on_copy  # noqa: F401, F811 -- outcomes is a fixture


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
        run_on_copy(outcomes, "load_tokenizer", name, source, tmp_path / f"qlip-{name}", mutate, load_tokenizer)

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
        run_on_copy(outcomes, "load_unified", name, source, tmp_path / f"unified-{name}", mutate, load_unified)

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
