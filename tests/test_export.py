"""Tokenizer export directories: strict round trip and clear errors for broken ones."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmcore.errors import UserError
from mmcore.text_tokenizer import train_sentencepiece
from tokenizer.export import load_tokenizer, save_tokenizer, tokenizer_hash
from tokenizer.qlip import QLIP, preset_config

SMALL = {"encoder": {"width": 32, "depth": 1, "heads": 2}, "decoder": {"width": 32, "depth": 1, "heads": 2},
         "text": {"width": 32, "depth": 1, "heads": 2}, "embed_dim": 32}


@pytest.fixture
def export_dir(tmp_path):
    torch.manual_seed(0)
    model = QLIP(preset_config("tiny", SMALL))
    text_model = train_sentencepiece(["a red circle", "a blue square"] * 20, tmp_path / "t.model", vocab_size=300)
    return save_tokenizer(model, tmp_path / "export", text_tokenizer_path=text_model, metadata={"stage": 1}), model


def test_round_trip_gives_identical_outputs(export_dir):
    path, model = export_dir
    loaded = load_tokenizer(path)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.reconstruct(pixels), loaded.model.reconstruct(pixels))
    assert loaded.metadata == {"stage": 1} and loaded.hash == tokenizer_hash(path)
    assert loaded.text_tokenizer.decode(loaded.text_tokenizer.encode("a red circle")) == "a red circle"


def test_missing_and_extra_keys_are_named(export_dir):
    path, _ = export_dir
    weights = load_file(path / "model.safetensors")
    key = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != key}, path / "model.safetensors")
    with pytest.raises(UserError, match=f"1 missing.*{key}"):
        load_tokenizer(path)
    save_file({**weights, "extra.weight": torch.zeros(1)}, path / "model.safetensors")
    with pytest.raises(UserError, match="1 unexpected.*extra.weight"):
        load_tokenizer(path)


def test_corrupt_weights_and_config_mismatch(export_dir):
    path, _ = export_dir
    good = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="corrupt or unreadable"):
        load_tokenizer(path)
    (path / "model.safetensors").write_bytes(good)
    header = json.loads((path / "config.json").read_text())
    header["qlip"]["decoder"]["width"] = 64
    (path / "config.json").write_text(json.dumps(header))
    with pytest.raises(UserError, match="does not match its config.*wrong shape"):
        load_tokenizer(path)
    header["qlip"]["decoder"]["widht"] = 64
    (path / "config.json").write_text(json.dumps(header))
    with pytest.raises(UserError, match="did you mean 'width'"):
        load_tokenizer(path)


def test_not_an_export(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(UserError, match="missing config.json"):
        load_tokenizer(tmp_path)
