"""QLIP model: output shapes, unit embeddings, EOT pooling, causality, 2D RoPE, stage-2 freezing,
presets (B/L parameter counts on the meta device) and config validation."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from mmcore.config import ConfigError, config_from_dict, config_to_dict, deep_merge
from tokenizer.bsq import BSQOutput
from tokenizer.qlip import (
    PRESETS, QLIP, QLIPConfig, QLIPOutput, TextConfig, ViTConfig, build_qlip, count_parameters,
    preset_config,
)
from tokenizer.text_encoder import TextEncoder
from tokenizer.vit import (
    Attention, ViTEncoder, apply_rope, grid_coords, patch_rope_angles, rope_2d_angles, rope_table,
)

B = 3


@pytest.fixture(scope="module")
def model() -> QLIP:
    torch.manual_seed(0)
    return build_qlip("tiny").eval()


def pixels(batch=B, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def text_batch(model, seed=0):
    """Right-padded ids (B, 12) with real lengths 5, 12, 8 and pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.text.vocab_size, (B, 12), generator=g)
    lengths = torch.tensor([5, 12, 8])
    mask = torch.arange(12)[None] < lengths[:, None]
    return ids.masked_fill(~mask, 0), mask, lengths


def unit_norm(x):
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[:-1]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# shapes and ranges
# ---------------------------------------------------------------------------------------------

def test_forward_shapes_and_ranges(model):
    cfg = model.config
    ids, mask, _ = text_batch(model)
    out = model(pixels(), ids, mask)
    assert isinstance(out, QLIPOutput) and isinstance(out.bsq, BSQOutput)
    N, L, G = cfg.encoder.num_patches, cfg.bsq.num_bits, cfg.bsq.num_groups
    assert (N, L, G) == (64, 12, 2)
    assert out.image_embeds.shape == (B, cfg.embed_dim)
    assert out.text_embeds.shape == (B, cfg.embed_dim)
    assert out.reconstruction.shape == (B, 3, 32, 32)
    assert out.bsq.quantized.shape == (B, N, L) and out.bsq.bits.shape == (B, N, L)
    assert out.bsq.bits.dtype == torch.bool
    assert out.bsq.group_indices.shape == (B, N, G) and out.bsq.group_indices.dtype == torch.int64
    assert out.bsq.loss.shape == () and out.logit_scale.shape == ()
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert unit_norm(out.image_embeds) and unit_norm(out.text_embeds)
    assert out.reconstruction.abs().max() <= 1.0

    enc = model.encode(pixels())
    assert enc.latents.shape == (B, N, L) and unit_norm(enc.latents)
    assert model.encode_image_embeds(pixels()).shape == (B, cfg.embed_dim)
    assert torch.allclose(model.encode_image_embeds(pixels()), out.image_embeds, atol=1e-6)
    assert torch.equal(model.encode_codes(pixels()).bits, out.bsq.bits)


def test_reconstruction_clamped_with_identity_gradient():
    torch.manual_seed(0)
    model = build_qlip("tiny")
    with torch.no_grad():
        model.decoder.head[-1].weight.mul_(1000)  # make the raw prediction overshoot
    x = pixels()
    out = model(x)
    assert out.reconstruction.abs().max() <= 1.0
    assert (out.reconstruction.abs() == 1).float().mean() > 0.2  # really saturated
    out.reconstruction.sum().backward()
    assert model.decoder.head[-1].bias.grad.abs().sum() > 0  # saturated pixels still learn


def test_decode_paths_agree(model):
    codes = model.encode_codes(pixels())
    from_quantized = model.decode_codes(codes.quantized)
    assert torch.allclose(model.decode_codes(codes.bits), from_quantized, atol=1e-6)
    assert torch.allclose(model.decode_group_indices(codes.group_indices), from_quantized,
                          atol=1e-6)
    assert torch.allclose(model.reconstruct(pixels()), from_quantized, atol=1e-6)
    with pytest.raises(TypeError):
        model.decode_codes(codes.bits.long())


def test_wrong_image_size_rejected(model):
    with pytest.raises(ValueError, match="32, 32"):
        model(pixels(size=48))


# ---------------------------------------------------------------------------------------------
# text tower
# ---------------------------------------------------------------------------------------------

def test_eot_pooling_uses_last_real_token(model):
    ids, mask, lengths = text_batch(model)
    ref = model.encode_text(ids, mask)
    assert torch.allclose(model.encode_text(ids, lengths=lengths), ref, atol=1e-6)

    after_eot = ids.clone()
    after_eot[0, 5:] = 7  # row 0 has 5 real tokens: positions >= 5 are pads
    after_eot[2, 8:] = 9
    assert torch.allclose(model.encode_text(after_eot, mask), ref, atol=1e-5)

    earlier = ids.clone()
    earlier[0, 2] = (ids[0, 2] + 1) % model.config.text.vocab_size
    changed = model.encode_text(earlier, mask)
    assert not torch.allclose(changed[0], ref[0], atol=1e-4)
    assert torch.allclose(changed[1:], ref[1:], atol=1e-6)  # rows are independent

    no_mask = model.encode_text(ids[1:2])  # all 12 tokens real: same as row 1
    assert torch.allclose(no_mask, ref[1:2], atol=1e-5)


def test_repeated_captions_are_encoded_once_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    model = build_qlip("tiny")
    ids, mask, _ = text_batch(model)
    repeated_ids, repeated_mask = ids[[0, 1, 0, 2, 1, 0]], mask[[0, 1, 0, 2, 1, 0]]  # 3 distinct rows of 6
    calls = []
    hook = model.text.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    weights = torch.randn(6, model.config.embed_dim)
    embeds = model.encode_text(repeated_ids, repeated_mask)
    (embeds * weights).sum().backward()
    hook.remove()
    assert calls == [3]  # the tower saw each distinct caption once
    grads = {name: p.grad.clone() for name, p in model.text.named_parameters() if p.grad is not None}
    model.zero_grad()
    one_by_one = torch.cat([model.text(repeated_ids[i:i + 1], repeated_mask[i:i + 1]).embeds for i in range(6)])
    (one_by_one * weights).sum().backward()
    assert torch.allclose(embeds, one_by_one, atol=1e-6)
    for name, p in model.text.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-5), name
    # a different mask is a different caption even with the same ids
    same_ids = ids[[1, 1]]
    masks = mask[[1, 1]].clone()
    masks[1, 6:] = False
    assert not torch.allclose(*model.encode_text(same_ids, masks).detach(), atol=1e-4)


def test_text_encoder_is_causal(model):
    ids, _, _ = text_batch(model)
    hidden = model.text(ids).hidden
    later = ids.clone()
    later[:, 6:] = (ids[:, 6:] + 3) % model.config.text.vocab_size
    hidden_later = model.text(later).hidden
    assert torch.allclose(hidden[:, :6], hidden_later[:, :6], atol=1e-5)
    assert not torch.allclose(hidden[:, 6:], hidden_later[:, 6:], atol=1e-4)


def test_text_input_validation(model):
    ids, mask, _ = text_batch(model)
    with pytest.raises(ValueError, match="right-padded"):
        model.encode_text(ids, mask.flip(-1))
    too_long = torch.zeros(1, model.config.text.context_length + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(too_long)


# ---------------------------------------------------------------------------------------------
# 2D RoPE
# ---------------------------------------------------------------------------------------------

def test_rope_preserves_norms():
    x = torch.randn(2, 4, 16, 32)
    rotated = apply_rope(x, rope_2d_angles(grid_coords(4, 4), 32))
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(rotated, x)


def test_rope_is_complex_multiplication_of_pairs():
    """Pair (x[2i], x[2i+1]) as x[2i] + j·x[2i+1], times e^{j·angle_i}: the definition, against the
    precomputed-table implementation (and the table built once equals the table built per call)."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 16, 32)
    angles = rope_2d_angles(grid_coords(4, 4), 32)
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
                                  * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    assert torch.allclose(apply_rope(x, angles), expected, atol=1e-6)
    assert torch.equal(apply_rope(x, rope_table(angles)), apply_rope(x, angles))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(16, 32), torch.randn(16, 32)
    coords = grid_coords(4, 4)

    def scores(shift):
        angles = rope_2d_angles(coords + torch.tensor(shift), 32)
        return apply_rope(q, angles) @ apply_rope(k, angles).T

    base = scores([0.0, 0.0])
    assert torch.allclose(scores([3.0, -5.0]), base, atol=1e-4)
    assert torch.allclose(scores([0.5, 11.0]), base, atol=1e-4)
    # and absolute positions are not simply ignored: swapping the axes changes the scores
    swapped = apply_rope(q, rope_2d_angles(coords.flip(-1), 32))
    assert not torch.allclose(swapped @ apply_rope(k, rope_2d_angles(coords.flip(-1), 32)).T,
                              base, atol=1e-3)


def test_rope_leaves_cls_unrotated_and_attention_runs():
    cfg = ViTConfig(width=32, heads=2, rope=True)
    angles = patch_rope_angles(cfg, num_prefix=1)
    assert angles.shape == (1 + cfg.num_patches, cfg.head_dim // 2)
    assert torch.count_nonzero(angles[0]) == 0
    attn = Attention(32, 2)
    x = torch.randn(2, 1 + cfg.num_patches, 32)
    assert attn(x, angles).shape == x.shape


# ---------------------------------------------------------------------------------------------
# stage 2: frozen encoder, no text tower
# ---------------------------------------------------------------------------------------------

def test_freeze_encoder_trains_only_bottleneck_and_decoder():
    torch.manual_seed(0)
    model = build_qlip("tiny").freeze_encoder()
    x = pixels()
    out = model(x)
    loss = (out.reconstruction - x).pow(2).mean() + out.bsq.loss
    loss.backward()
    for name, p in model.named_parameters():
        trainable = name.startswith(("bottleneck.", "decoder."))
        assert p.requires_grad == trainable, name
        assert (p.grad is not None) == trainable, name
    counts, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    assert trainable["total"] == counts["bottleneck"] + counts["decoder"]


def test_without_text_tower():
    model = build_qlip(preset_config("tiny", {"text": None}))
    assert model.text is None and count_parameters(model)["text"] == 0
    out = model(pixels())
    assert out.text_embeds is None and out.reconstruction.shape == (B, 3, 32, 32)
    with pytest.raises(RuntimeError, match="no text tower"):
        model.encode_text(torch.zeros(1, 4, dtype=torch.long))

    dropped = build_qlip("tiny").drop_text()
    assert dropped.text is None and dropped.config.text is None
    assert dropped(pixels()).text_embeds is None


def test_decode_count_decodes_the_first_images_only(model):
    x = pixels()
    with torch.no_grad():
        full = model(x)
        part = model(x, decode_count=2)
    assert part.reconstruction.shape == (2, 3, 32, 32)
    assert torch.allclose(part.reconstruction, full.reconstruction[:2], atol=1e-6)
    # the contrastive embedding and the codes still cover every image
    assert torch.equal(part.image_embeds, full.image_embeds)
    assert torch.equal(part.bsq.bits, full.bsq.bits)


# ---------------------------------------------------------------------------------------------
# image pooling of the contrastive embedding
# ---------------------------------------------------------------------------------------------

def test_image_pool_reads_what_it_names():
    torch.manual_seed(0)
    x = pixels()
    cls_model = build_qlip(preset_config("tiny", {"image_pool": "cls"})).eval()
    with torch.no_grad():
        features = cls_model.encoder(x)
        head = cls_model.image_head
        assert torch.allclose(cls_model.encode_image_embeds(x),
                              F.normalize(head.proj(head.norm(features.cls)), dim=-1), atol=1e-6)
        mean_model = build_qlip(preset_config("tiny", {"image_pool": "mean"})).eval()
        mean_model.load_state_dict(cls_model.state_dict())  # same parameters: only the pooling differs
        expected = F.normalize(head.proj(head.norm(features.patches.mean(1))), dim=-1)
        assert torch.allclose(mean_model.encode_image_embeds(x), expected, atol=1e-6)


def test_attention_pool_is_a_probe_over_cls_and_patches():
    torch.manual_seed(0)
    model = build_qlip(preset_config("tiny", {"image_pool": "attention"})).eval()
    x = pixels()
    with torch.no_grad():
        features = model.encoder(x)
        head = model.image_head
        tokens = head.pool_norm(torch.cat([features.cls[:, None], features.patches], 1))
        w = model.config.encoder.width
        q_w, k_w, v_w = head.pool_attn.in_proj_weight.split(w)
        q_b, k_b, v_b = head.pool_attn.in_proj_bias.split(w)
        heads = model.config.encoder.heads
        q = rearrange(head.probe @ q_w.T + q_b, "o n (h d) -> o h n d", h=heads)  # (1, H, 1, D)
        k = rearrange(tokens @ k_w.T + k_b, "b n (h d) -> b h n d", h=heads)
        v = rearrange(tokens @ v_w.T + v_b, "b n (h d) -> b h n d", h=heads)
        read = F.scaled_dot_product_attention(q.expand(len(x), -1, -1, -1), k, v)  # (B, H, 1, D)
        pooled = head.pool_attn.out_proj(rearrange(read, "b h n d -> b n (h d)"))[:, 0]
        expected = F.normalize(head.proj(head.norm(pooled)), dim=-1)
        assert torch.allclose(model.encode_image_embeds(x), expected, atol=1e-5)
        # every image token can change the embedding (the [CLS] one included)
        shifted = features._replace(cls=features.cls.flip(-1))  # not a constant shift: LayerNorm removes those
        assert not torch.allclose(head(shifted), head(features))
    # stage 2 freezes the pooling head with the rest of the encoder side
    frozen = build_qlip(preset_config("tiny", {"image_pool": "attention"})).freeze_encoder()
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if n.startswith("image_head."))


# ---------------------------------------------------------------------------------------------
# presets and parameter counts
# ---------------------------------------------------------------------------------------------

def test_preset_table_is_consistent():
    assert set(PRESETS) >= {"tiny", "B-16-256", "B-8-256", "L-14-392"}
    for name, cfg in PRESETS.items():
        cfg.validate()
        assert config_from_dict(QLIPConfig, config_to_dict(cfg)) == cfg, name
    tiny = preset_config("tiny")
    assert tiny is not PRESETS["tiny"] and tiny == PRESETS["tiny"]
    assert preset_config("tiny", {"bsq": {"entropy_weight": 0.5}}).bsq.entropy_weight == 0.5
    with pytest.raises(ConfigError, match="unknown QLIP preset"):
        preset_config("B-32")


@pytest.mark.parametrize("name, encoder, decoder, bottleneck, tol", [
    # paper: 87M + 87M + 1M (B), 304M + 304M + 2M (L); bottleneck figures are rounded to 1 digit
    ("B-16-256", 87e6, 87e6, 1e6, dict(trunk=0.02, bottleneck=0.3)),
    ("L-14-392", 304e6, 304e6, 2e6, dict(trunk=0.01, bottleneck=0.15)),
])
def test_released_shapes_match_paper_counts(name, encoder, decoder, bottleneck, tol):
    with torch.device("meta"):
        counts = count_parameters(build_qlip(name))
    assert counts["encoder"] == pytest.approx(encoder, rel=tol["trunk"])
    assert counts["decoder"] == pytest.approx(decoder, rel=tol["trunk"])
    assert counts["bottleneck"] == pytest.approx(bottleneck, rel=tol["bottleneck"])
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_text_tower_matches_openclip_b():
    with torch.device("meta"):
        text = TextEncoder(PRESETS["B-16-256"].text, embed_dim=512)
    assert sum(p.numel() for p in text.parameters()) == pytest.approx(63.4e6, rel=0.01)


# ---------------------------------------------------------------------------------------------
# config validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"encoder": {"image_size": 30}}, "divisible by patch_size"),
    ({"encoder": {"heads": 5}}, "divisible by heads"),
    ({"encoder": {"width": 120, "heads": 4, "rope": True}}, "RoPE"),
    ({"decoder": {"patch_size": 8}}, "token grid"),
    # mmcore reports a bad value of an Optional field by naming the type, not the inner error
    ({"text": {"width": 100, "heads": 3}}, "TextConfig"),
    ({"bsq": {"num_bits": 13}}, "divisible by group_size"),
    ({"embed_dim": 0}, "embed_dim"),
    ({"bottleneck_act": "relu"}, "bottleneck_act"),
    ({"image_pool": "max"}, "image_pool"),
    ({"encoder": {"widht": 64}}, "did you mean 'width'"),
])
def test_config_errors(change, message):
    data = config_to_dict(PRESETS["tiny"])
    with pytest.raises(ConfigError, match=message):
        config_from_dict(QLIPConfig, deep_merge(data, change))


def test_model_validates_config():
    bad = dataclasses.replace(PRESETS["tiny"],
                              encoder=dataclasses.replace(PRESETS["tiny"].encoder, image_size=30))
    with pytest.raises(ConfigError, match="divisible"):
        QLIP(bad)
    with pytest.raises(ConfigError):
        ViTEncoder(ViTConfig(width=64, heads=3))
    with pytest.raises(ConfigError, match="divisible by heads"):
        TextEncoder(TextConfig(width=100, heads=3), embed_dim=8)
    assert QLIPConfig().text == PRESETS["tiny"].text  # defaults are the tiny shape
    assert math.isclose(PRESETS["tiny"].init_temperature, 0.07)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_separate_rope_and_sdpa(causal):
    """The fused path (q and k rotated in one multiply, strided views into SDPA) computes the
    textbook one: split heads, rotate q and k separately, attend, merge heads, project."""
    torch.manual_seed(0)
    attn = Attention(32, 2, sub_ln=True)
    x = torch.randn(2, 17, 32)
    angles = patch_rope_angles(ViTConfig(image_size=16, patch_size=4, width=32, heads=2, rope=True), 1)
    q, k, v = rearrange(attn.qkv(x), "b n (three h d) -> three b h n d", three=3, h=2)
    out = F.scaled_dot_product_attention(apply_rope(q, angles), apply_rope(k, angles), v, is_causal=causal)
    expected = attn.proj(attn.inner_norm(rearrange(out, "b h n d -> b n (h d)")))
    assert torch.allclose(attn(x, rope_table(angles), causal), expected, atol=1e-5)
    assert torch.allclose(attn(x, angles, causal), expected, atol=1e-5)


def test_code_head_embeds_the_mean_of_the_codes_and_trains_the_encoder():
    """code_head: code_embeds is L2(Linear(mean over patches of the quantized codes)), so only
    what the codes carry reaches it; its gradient reaches the encoder through the quantizer's
    straight-through estimator; without the head there is no code_embeds; freeze_encoder freezes it."""
    torch.manual_seed(0)
    plain = build_qlip(preset_config("tiny", {"text": None}))
    assert plain.code_head is None and plain(pixels()).code_embeds is None
    torch.manual_seed(0)
    model = build_qlip(preset_config("tiny", {"text": None, "code_head": True}))
    out = model(pixels())
    expected = torch.nn.functional.normalize(model.code_head.proj(out.bsq.quantized.mean(dim=1)), dim=-1)
    assert out.code_embeds.shape == (B, model.config.embed_dim) and unit_norm(out.code_embeds)
    assert torch.allclose(out.code_embeds, expected, atol=1e-6)
    out.code_embeds.sum().backward()
    assert model.encoder.patch_embed.weight.grad is not None
    assert float(model.encoder.patch_embed.weight.grad.abs().sum()) > 0
    assert count_parameters(model)["encoder"] == count_parameters(plain)["encoder"] + sum(
        p.numel() for p in model.code_head.parameters())
    model.freeze_encoder()
    assert not any(p.requires_grad for p in model.code_head.parameters())


def test_attention_code_pool_weights_patches_by_a_softmax_of_their_codes():
    """code_pool=attention: the pooled codes are a convex combination of the patches' codes, with
    weights softmax(score(code)); a patch's weight depends on its own code only."""
    torch.manual_seed(0)
    model = build_qlip(preset_config("tiny", {"text": None, "code_head": True, "code_pool": "attention"}))
    quantized = model(pixels()).bsq.quantized.detach()  # (B, N, L)
    head = model.code_head
    weights = head.score(quantized).softmax(dim=1)  # (B, N, 1)
    assert torch.allclose(weights.sum(dim=1), torch.ones(B, 1))
    assert torch.allclose(head.pooled(quantized), (weights * quantized).sum(dim=1), atol=1e-6)
    swapped = quantized.clone()
    swapped[:, [0, 1]] = quantized[:, [1, 0]]  # the pool ignores the patches' order
    assert torch.allclose(head.pooled(swapped), head.pooled(quantized), atol=1e-6)
    with pytest.raises(ConfigError, match="code_pool"):
        preset_config("tiny", {"code_pool": "max"}).validate()
