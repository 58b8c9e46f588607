"""The unified decoder: preset table, tiny forward, strict extension of a local HF Llama."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from mmcore.config import ConfigError, config_from_dict
from mmcore.errors import UserError
from unified_mm.model import (PRESETS, UnifiedModelConfig, build_model, count_parameters,
                              preset_llama_config, resolve_attention, special_token_ids)
from unified_mm.vocab import Vocab

SHAPES = Vocab(519, 2, 6, 8)  # ShapesWorld: 512 pieces + 7 specials, 12 bits as 2 x 6, 8x8 grid
QLIP28 = Vocab(32_007, 2, 14, 16)  # Llama-2 sentencepiece + 7 specials, QLIP 28 bits as 2 x 14
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
         "intermediate_size": 64}


def analytic_count(config: LlamaConfig) -> dict:
    """Llama parameter count from the config alone."""
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head_dim = h // config.num_attention_heads
    attn = h * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    per_layer = attn + 3 * h * i + 2 * h  # q,k,v,o + gate,up,down + two RMSNorms
    non_embedding = layers * per_layer + h  # + final norm
    embedding = v * h * (1 if config.tie_word_embeddings else 2)
    return {"total": non_embedding + embedding, "embedding": embedding, "non_embedding": non_embedding}


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("vocab", [SHAPES, QLIP28], ids=["shapesworld", "qlip28"])
def test_presets_build_configs_with_the_vocab_rows(name, vocab):
    config = preset_llama_config(name, vocab)
    assert config.vocab_size == vocab.size and config.head_dim * config.num_attention_heads == config.hidden_size
    ids = special_token_ids(vocab)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (ids["<pad>"], ids["<bos>"], ids["<eos>"])
    with torch.device("meta"):  # never materialise the big ones
        model = LlamaForCausalLM._from_config(config)
    assert model.get_input_embeddings().weight.shape[0] == vocab.size
    assert model.get_output_embeddings().weight.shape[0] == vocab.size
    assert count_parameters(model) == analytic_count(config)


def test_preset_shapes():
    tiny, llama = preset_llama_config("tiny", SHAPES), preset_llama_config("llama-3.2-1b", QLIP28)
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.head_dim, tiny.num_key_value_heads,
            tiny.intermediate_size, tiny.max_position_embeddings, tiny.tie_word_embeddings) == \
        (128, 4, 32, 4, 512, 512, False)
    assert tiny.rope_parameters["rope_theta"] == 10_000
    assert (llama.hidden_size, llama.num_hidden_layers, llama.num_attention_heads, llama.num_key_value_heads,
            llama.intermediate_size, llama.rms_norm_eps, llama.tie_word_embeddings) == \
        (2048, 16, 32, 8, 8192, 1e-5, True)
    assert llama.rope_parameters == {"rope_type": "default", "rope_theta": 500_000.0}
    # The published Llama-3.2-1B: 1,235,814,400 parameters with its 128,256-row tied embedding.
    counts = analytic_count(llama)
    assert counts["non_embedding"] + 128_256 * 2048 == 1_235_814_400
    assert 80e6 < analytic_count(preset_llama_config("base-100m", SHAPES))["non_embedding"] < 110e6


def test_tiny_builds_and_runs_a_forward():
    torch.manual_seed(0)
    model = build_model(UnifiedModelConfig(preset="tiny"), SHAPES, text_pieces=512)
    assert model.training and model.config._attn_implementation == "sdpa"
    assert model.get_input_embeddings().weight.shape == (SHAPES.size, 128)
    assert model.dtype == torch.float32
    ids = torch.randint(0, SHAPES.size, (2, 12))
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 12, SHAPES.size) and torch.isfinite(logits).all()


def test_overrides_and_configs_are_not_shared():
    cfg = UnifiedModelConfig(overrides={**SMALL, "rope_theta": 1234.0, "tie_word_embeddings": True},
                             gradient_checkpointing=True)
    a, b = build_model(cfg, SHAPES), build_model(cfg, SHAPES)
    assert a.config is not b.config and a.config.num_hidden_layers == 2
    assert a.config.rope_parameters["rope_theta"] == 1234.0
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert a.is_activation_checkpointing
    ids = torch.randint(0, SHAPES.size, (2, 8))
    a.train()(input_ids=ids, labels=ids).loss.backward()  # checkpointed backward runs
    assert a.model.layers[0].mlp.up_proj.weight.grad is not None
    a.resize_token_embeddings(SHAPES.size + 8)
    assert b.config.vocab_size == SHAPES.size and PRESETS["tiny"]["hidden_size"] == 128


def test_bad_configs_are_named():
    with pytest.raises(UserError, match="unknown model preset 'huge'; known: tiny, small"):
        config_from_dict(UnifiedModelConfig, {"preset": "huge"})
    with pytest.raises(UserError, match="unknown LlamaConfig field 'num_layers'.*did you mean 'num_hidden_layers'"):
        config_from_dict(UnifiedModelConfig, {"overrides": {"num_layers": 2}})
    with pytest.raises(UserError, match="overrides.vocab_size: set from the unified vocabulary"):
        config_from_dict(UnifiedModelConfig, {"overrides": {"vocab_size": 10}})
    with pytest.raises(UserError, match="'flash' is not one of auto, sdpa, eager, flash_attention_2"):
        config_from_dict(UnifiedModelConfig, {"attn_implementation": "flash"})
    with pytest.raises(UserError, match="text tokenizer has 500 pieces.*implies 512"):
        build_model(UnifiedModelConfig(), SHAPES, text_pieces=500)


def test_resolve_attention():
    assert resolve_attention("auto", "cpu") == "sdpa"
    assert resolve_attention("eager", "cpu") == "eager"
    with pytest.raises(UserError, match="flash_attention_2"):
        resolve_attention("flash_attention_2", "cpu")


# ---------------------------------------------------------------------------------------------
# Extending a local HF Llama
# ---------------------------------------------------------------------------------------------

N_PIECES = 50
EXT_VOCAB = Vocab(N_PIECES + 7, 2, 3, 2)  # 57 text ids + 2 x 8 image ids = 73


def make_replica(path, tie: bool):
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=N_PIECES, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, **SMALL)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_extend_local_llama_keeps_text_rows_and_mean_inits_new_rows(tmp_path, tie):
    original = make_replica(tmp_path / "llama", tie)
    model = build_model(UnifiedModelConfig(pretrained=str(tmp_path / "llama")), EXT_VOCAB, text_pieces=N_PIECES)
    n = N_PIECES
    for get in (lambda m: m.get_input_embeddings().weight, lambda m: m.get_output_embeddings().weight):
        old, new = get(original).detach(), get(model).detach()
        assert new.shape == (EXT_VOCAB.size, 32)
        assert torch.equal(new[:n], old)  # bit-identical
        assert torch.equal(new[n:], old.float().mean(0).expand(EXT_VOCAB.size - n, -1))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert model.config.vocab_size == EXT_VOCAB.size
    ids = special_token_ids(EXT_VOCAB)
    assert model.config.bos_token_id == ids["<bos>"] == model.generation_config.bos_token_id
    assert model.config.eos_token_id == ids["<eos>"] == model.generation_config.eos_token_id
    layer = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[layer], original.state_dict()[layer])
    # text-only inputs give the same text logits as before
    text = torch.randint(0, n, (2, 9))
    with torch.no_grad():
        before, after = original(input_ids=text).logits, model.eval()(input_ids=text).logits
    torch.testing.assert_close(after[..., :n], before, rtol=1e-5, atol=1e-5)


def test_pretrained_errors_are_named(tmp_path):
    with pytest.raises(UserError, match="pretrained model directory not found"):
        build_model(UnifiedModelConfig(pretrained=str(tmp_path / "nope")), EXT_VOCAB)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing config.json"):
        build_model(UnifiedModelConfig(pretrained=str(tmp_path / "empty")), EXT_VOCAB)
    make_replica(tmp_path / "llama", tie=False)
    model = build_model(UnifiedModelConfig(pretrained=str(tmp_path / "llama"),
                                           overrides={"max_position_embeddings": 256, "rope_theta": 7.0}), EXT_VOCAB)
    assert model.config.max_position_embeddings == 256 and model.config.rope_parameters["rope_theta"] == 7.0
    with pytest.raises(UserError, match="does not match its config.json: .*missing \\(e.g. model.layers.2"):
        build_model(UnifiedModelConfig(pretrained=str(tmp_path / "llama"), overrides={"num_hidden_layers": 3}),
                    EXT_VOCAB)
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(UserError, match="model_type is 'mistral', expected 'llama'"):
        build_model(UnifiedModelConfig(pretrained=str(tmp_path / "llama")), EXT_VOCAB)
    make_replica(tmp_path / "llama", tie=False)
    other = Vocab(N_PIECES + 2 + 7, 2, 3, 2)
    with pytest.raises(UserError, match="vocab_size 50 != 52 pieces"):
        build_model(UnifiedModelConfig(pretrained=str(tmp_path / "llama")), other, text_pieces=N_PIECES + 2)
    weights_path = tmp_path / "llama" / "model.safetensors"
    weights = load_file(weights_path)
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"} | {"extra.bias": torch.zeros(1)},
              weights_path, metadata={"format": "pt"})
    with pytest.raises(UserError, match="1 missing \\(e.g. model.norm.weight\\); 1 unexpected \\(e.g. extra.bias\\)"):
        build_model(UnifiedModelConfig(pretrained=str(tmp_path / "llama")), EXT_VOCAB)
    save_file(weights, weights_path, metadata={"format": "pt"})
    good = weights_path.read_bytes()
    weights_path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(UserError, match="corrupt or unreadable safetensors"):
        build_model(UnifiedModelConfig(pretrained=str(tmp_path / "llama")), EXT_VOCAB)
    weights_path.unlink()
    with pytest.raises(UserError, match="missing model.safetensors"):
        build_model(UnifiedModelConfig(pretrained=str(tmp_path / "llama")), EXT_VOCAB)


def test_bit_pattern_init_of_image_rows():
    """image_embedding_init=bits: every image row is a fixed linear map of its code's ±1 bits (so
    rows are affine in the bits, and codes differing in one bit differ by one column); text rows
    and the global RNG stream are untouched; 'default' leaves the preset's init as it was."""
    cfg = UnifiedModelConfig(overrides=SMALL)
    torch.manual_seed(0)
    plain = build_model(cfg, SHAPES)
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    bits = build_model(UnifiedModelConfig(overrides=SMALL, image_embedding_init="bits"), SHAPES)
    assert torch.equal(torch.rand(3), after_plain)  # the init used a private generator
    start = SHAPES.image_start
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        old, new = getattr(plain, getter)().weight, getattr(bits, getter)().weight
        assert torch.equal(old[:start], new[:start])
        for group in range(SHAPES.num_groups):
            lo, hi = SHAPES.group_range(group)
            signs = SHAPES.code_bits(torch.arange(SHAPES.group_vocab)).float() * 2 - 1  # (64, 6)
            # least squares recovers the projection exactly: the rows are linear in the signs
            solution = torch.linalg.lstsq(signs, new[lo:hi].detach()).solution  # (6, hidden)
            assert torch.allclose(signs @ solution, new[lo:hi], atol=1e-6)
            assert 0.5 < float(new[lo:hi].detach().std() / old[:start].detach().std()) < 2  # default init scale
    with pytest.raises(Exception, match="image_embedding_init"):
        UnifiedModelConfig(image_embedding_init="zeros").validate()


def test_bit_init_with_random_share_mixes_the_default_rows():
    """image_embedding_random=r: each image row is sqrt(1-r)·(the bits map) + sqrt(r)·(the row the
    default init drew), so the rows are no longer linear in the bits; text rows untouched."""
    r = 0.5
    rows = {}
    for name, kwargs in {"plain": {}, "bits": {"image_embedding_init": "bits"},
                         "mixed": {"image_embedding_init": "bits", "image_embedding_random": r}}.items():
        torch.manual_seed(0)
        rows[name] = build_model(UnifiedModelConfig(overrides=SMALL, **kwargs), SHAPES).get_input_embeddings().weight
    start = SHAPES.image_start
    assert torch.equal(rows["mixed"][:start], rows["plain"][:start])
    expected = (1 - r) ** 0.5 * rows["bits"][start:] + r ** 0.5 * rows["plain"][start:]
    assert torch.allclose(rows["mixed"][start:], expected, atol=1e-7)
    lo, hi = SHAPES.group_range(0)
    signs = SHAPES.code_bits(torch.arange(SHAPES.group_vocab)).float() * 2 - 1  # (64, 6)
    solution = torch.linalg.lstsq(signs, rows["mixed"][lo:hi].detach()).solution
    assert not torch.allclose(signs @ solution, rows["mixed"][lo:hi], atol=1e-3)  # a per-id part
    for bad, match in (({"image_embedding_init": "bits", "image_embedding_random": 1.0}, r"\[0, 1\)"),
                       ({"image_embedding_random": 0.5}, "needs image_embedding_init: bits")):
        with pytest.raises(ConfigError, match=match):
            UnifiedModelConfig(**bad).validate()


def test_attention_init_scale_multiplies_only_query_and_key_weights():
    """attention_init_scale=s: every layer's q_proj/k_proj start s times the default draw; the
    rest of the model (values, outputs, MLPs, embeddings) is the same draw unchanged."""
    weights = {}
    for scale in (1.0, 4.0):
        torch.manual_seed(0)
        weights[scale] = build_model(UnifiedModelConfig(overrides=SMALL, image_embedding_init="bits",
                                                        attention_init_scale=scale), SHAPES).state_dict()
    scaled = [k for k in weights[1.0] if k.endswith(("q_proj.weight", "k_proj.weight"))]
    assert len(scaled) == 2 * SMALL["num_hidden_layers"]
    for key, plain in weights[1.0].items():
        expected = plain * 4.0 if key in scaled else plain
        assert torch.equal(weights[4.0][key], expected), key
    for bad, match in (({"attention_init_scale": 0.0}, "must be > 0"),
                       ({"attention_init_scale": 2.0, "pretrained": "some/dir"}, "corrupt the pretrained")):
        with pytest.raises(ConfigError, match=match):
            UnifiedModelConfig(**bad).validate()


def test_code_bits_are_msb_first():
    bits = SHAPES.code_bits(torch.tensor([0, 1, 32, 63]))
    assert bits.int().tolist() == [[0] * 6, [0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0], [1] * 6]
