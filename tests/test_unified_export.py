"""Unified model export directories: strict round trip, hash, and clear errors for broken ones."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmcore.errors import UserError
from mmcore.text_tokenizer import TextTokenizer, train_sentencepiece
from tokenizer.export import save_tokenizer, tokenizer_hash
from tokenizer.qlip import QLIP, preset_config
from unified_mm import export as unified_export
from unified_mm.export import (DEFAULT_SAMPLER, EXPORT_FORMAT, load_qlip, load_unified, read_unified_header,
                               save_unified, unified_hash)
from unified_mm.model import UnifiedModelConfig, build_model
from unified_mm.vocab import Vocab

QLIP_SMALL = {"encoder": {"width": 32, "depth": 1, "heads": 2}, "decoder": {"width": 32, "depth": 1, "heads": 2},
              "text": {"width": 32, "depth": 1, "heads": 2}, "embed_dim": 32}
LLAMA_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
               "intermediate_size": 64}
CORPUS = ["a red circle", "a blue square", "how many shapes are there", "two"] * 20


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Text tokenizer, QLIP export (tiny: 12 bits = 2 x 6 on an 8x8 grid), vocab, model, export."""
    root = tmp_path_factory.mktemp("unified")
    torch.manual_seed(0)
    text_path = train_sentencepiece(CORPUS, root / "text.model", vocab_size=300)
    text = TextTokenizer(text_path)
    qlip = save_tokenizer(QLIP(preset_config("tiny", QLIP_SMALL)), root / "qlip", text_tokenizer_path=text_path)
    vocab = Vocab.for_tokenizers(text.vocab_size, 12, 6, 8)
    model = build_model(UnifiedModelConfig(overrides=LLAMA_SMALL), vocab, text_pieces=text.n_text).eval()
    export = save_unified(model, vocab, root / "export", text_tokenizer_path=text_path, tokenizer_dir=qlip,
                          metadata={"step": 7}, sampler_defaults={"top_k": 5, "cfg_scale": 2})
    return {"root": root, "text": text_path, "qlip": qlip, "vocab": vocab, "model": model, "export": export}


@pytest.fixture
def copy(env, tmp_path):
    """A private copy of the export to break."""
    return shutil.copytree(env["export"], tmp_path / "export")


def batch(vocab, seed=0):
    return torch.randint(0, vocab.size, (2, 10), generator=torch.Generator().manual_seed(seed))


def test_round_trip_gives_identical_logits(env):
    loaded = load_unified(env["export"])
    ids = batch(env["vocab"])
    with torch.no_grad():
        assert torch.equal(env["model"](input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    assert not loaded.model.training
    assert loaded.vocab == env["vocab"]
    assert loaded.sampler_defaults == {**DEFAULT_SAMPLER, "top_k": 5, "cfg_scale": 2.0}
    assert loaded.metadata == {"step": 7}
    assert loaded.text_tokenizer.fingerprint == TextTokenizer(env["text"]).fingerprint
    assert loaded.tokenizer_hash == tokenizer_hash(env["qlip"]) == tokenizer_hash(loaded.tokenizer_dir)
    assert loaded.hash == unified_hash(env["export"])
    header = read_unified_header(env["export"])
    assert header["format"] == EXPORT_FORMAT and header["tokenizer"] == {"dir": "qlip", "hash": loaded.tokenizer_hash}
    assert header["text_tokenizer"]["vocab_size"] == env["vocab"].text_vocab_size
    names = {p.name for p in env["export"].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "unified_mm.json", "qlip"} <= names
    assert not [p for p in env["root"].iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_bundled_qlip_decodes_codes(env):
    loaded = load_unified(env["export"])
    qlip = load_qlip(loaded)
    assert qlip.hash == loaded.tokenizer_hash
    codes = torch.randint(0, loaded.vocab.group_vocab, (1, loaded.vocab.num_patches, loaded.vocab.num_groups))
    ids = loaded.vocab.codes_to_ids(codes)  # the model's image ids -> back to codes -> pixels
    with torch.no_grad():
        image = qlip.model.decode_group_indices(loaded.vocab.ids_to_codes(ids))
    assert image.shape == (1, 3, 32, 32)


def test_tied_model_and_explicit_state_dict(env, tmp_path):
    vocab = env["vocab"]
    model = build_model(UnifiedModelConfig(overrides={**LLAMA_SMALL, "tie_word_embeddings": True}), vocab).eval()
    state = {k: v + 1 if k == "model.norm.weight" else v for k, v in model.state_dict().items()}
    path = save_unified(model, vocab, tmp_path / "tied", text_tokenizer_path=env["text"],
                        tokenizer_dir=env["qlip"], state_dict=state)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")  # stored once
    loaded = load_unified(path)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert torch.equal(loaded.model.model.norm.weight, state["model.norm.weight"])
    model.load_state_dict(state)
    ids = batch(vocab, 1)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    bad = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(UserError, match="state_dict does not match the model: 1 missing.*model.norm.weight"):
        save_unified(model, vocab, tmp_path / "bad", text_tokenizer_path=env["text"], tokenizer_dir=env["qlip"],
                     state_dict=bad)
    assert not (tmp_path / "bad").exists()


def test_hash_is_stable_and_changes_with_a_weight(copy):
    first = unified_hash(copy)
    assert unified_hash(copy) == first and load_unified(copy).hash == first
    weights = load_file(copy / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].clone()
    weights["model.norm.weight"][0] += 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert unified_hash(copy) != first


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.model", "unified_mm.json", "qlip"])
def test_missing_file_is_named(copy, name):
    target = copy / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError, match=f"missing {name}"):
        load_unified(copy)


def test_missing_extra_and_corrupt_weights(copy):
    weights = load_file(copy / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    save_file({k: v for k, v in weights.items() if k != key}, copy / "model.safetensors")
    with pytest.raises(UserError, match=f"model.safetensors does not match its config: 1 missing \\(e.g. {key}\\)"):
        load_unified(copy)
    save_file({**weights, "extra.weight": torch.zeros(1)}, copy / "model.safetensors")
    with pytest.raises(UserError, match="1 unexpected \\(e.g. extra.weight\\)"):
        load_unified(copy)
    save_file(weights, copy / "model.safetensors")
    good = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="model.safetensors: corrupt or unreadable"):
        load_unified(copy)


def edit_header(path, **changes):
    header = json.loads((path / "unified_mm.json").read_text())
    for dotted, value in changes.items():
        cursor = header
        *parents, last = dotted.split("__")
        for part in parents:
            cursor = cursor[part]
        cursor[last] = value
    (path / "unified_mm.json").write_text(json.dumps(header))


def test_header_checks_are_named(copy, env):
    vocab = env["vocab"]
    edit_header(copy, format="unified-mm/0")
    with pytest.raises(UserError, match="format is 'unified-mm/0', expected 'unified-mm/1'"):
        load_unified(copy)
    edit_header(copy, format=EXPORT_FORMAT, vocab__num_groups=3)
    size = vocab.size
    with pytest.raises(UserError, match=f"vocab has {size + 64} ids, but .*config.json has vocab_size {size}"):
        load_unified(copy)
    edit_header(copy, vocab__num_groups=2, vocab__grid_size=4)
    with pytest.raises(UserError, match="qlip: tokenizer codes are 12 bits in groups of 6 on a 8x8 grid"):
        load_unified(copy)
    edit_header(copy, vocab__grid_size=8, text_tokenizer__fingerprint="0" * 16)
    with pytest.raises(UserError, match="tokenizer.model: fingerprint .* != text_tokenizer.fingerprint 0000"):
        load_unified(copy)
    edit_header(copy, text_tokenizer__fingerprint=TextTokenizer(env["text"]).fingerprint, tokenizer__hash="f" * 16)
    with pytest.raises(UserError, match="bundled tokenizer hash .* != tokenizer.hash ffff"):
        load_unified(copy)
    edit_header(copy, tokenizer__hash=tokenizer_hash(env["qlip"]), tokenizer__dir="../qlip")
    with pytest.raises(UserError, match="field 'tokenizer.dir' must name an entry of the export directory"):
        load_unified(copy)
    edit_header(copy, tokenizer__dir="qlip", sampler_defaults__tempreature=0.5)
    with pytest.raises(UserError, match="unknown sampler default 'tempreature'"):
        load_unified(copy)


def test_other_text_tokenizer_and_changed_qlip_are_refused(copy):
    train_sentencepiece(CORPUS + ["a green cross"] * 10, copy / "tokenizer.model", vocab_size=300)
    with pytest.raises(UserError, match="tokenizer.model: fingerprint"):
        load_unified(copy)


def test_changed_bundled_tokenizer_is_refused(copy):
    config = json.loads((copy / "qlip" / "config.json").read_text())
    config["metadata"] = {"stage": 2}
    (copy / "qlip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="qlip: bundled tokenizer hash"):
        load_unified(copy)


def test_failed_save_leaves_nothing(env, tmp_path, monkeypatch):
    args = dict(text_tokenizer_path=env["text"], tokenizer_dir=env["qlip"])
    with pytest.raises(UserError, match="tokenizer directory not found"):
        save_unified(env["model"], env["vocab"], tmp_path / "out", **{**args, "tokenizer_dir": tmp_path / "nope"})
    with pytest.raises(UserError, match="unknown sampler default 'topk'"):
        save_unified(env["model"], env["vocab"], tmp_path / "out", sampler_defaults={"topk": 3}, **args)
    with pytest.raises(UserError, match="top_p must be in \\(0, 1\\]"):
        save_unified(env["model"], env["vocab"], tmp_path / "out", sampler_defaults={"top_p": 0}, **args)
    other = Vocab(env["vocab"].text_vocab_size + 1, 2, 6, 8)
    with pytest.raises(UserError, match="text ids .* but vocab.text_vocab_size is"):
        save_unified(env["model"], other, tmp_path / "out", **args)

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(unified_export, "tokenizer_hash", fail)  # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        save_unified(env["model"], env["vocab"], tmp_path / "out", **args)
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_overwrite(env, tmp_path):
    args = dict(text_tokenizer_path=env["text"], tokenizer_dir=env["qlip"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(UserError, match="not empty; pass overwrite=True"):
        save_unified(env["model"], env["vocab"], out, **args)
    save_unified(env["model"], env["vocab"], out, overwrite=True, **args)
    assert not (out / "old.txt").exists() and load_unified(out).vocab == env["vocab"]
    first = unified_hash(out)
    save_unified(env["model"], env["vocab"], out, overwrite=True, **args)  # same content -> same hash
    assert unified_hash(out) == first != unified_hash(env["export"])  # the fixture stored other metadata
