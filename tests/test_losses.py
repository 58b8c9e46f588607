"""Tokenizer losses: CLIP (plain, duplicate-aware, 2-rank gathered), perceptual, LPIPS-VGG, GAN,
R1, adaptive weight, PSNR and the config pieces."""
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from mmcore.config import ConfigError, config_from_dict
from mmcore.errors import UserError
from tokenizer.losses import (
    ClipLossOutput, EncoderBlockFeatures, GANConfig, LPIPSVGG, PatchDiscriminator,
    PerceptualConfig, PerceptualLoss, adaptive_gan_weight, build_perceptual_loss, clip_loss,
    discriminator_loss, generator_loss, label_ids, mse_loss, positives_between, positives_from_labels, psnr,
    r1_penalty,
)
from tokenizer.vit import ViTConfig, ViTEncoder

LABELS = ["red circle", "blue square", "red circle", "green star",
          "blue square", "red circle", "tiny cross", "green star"]


def embeds(n, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1).float()


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


# ---------------------------------------------------------------------------------------------
# CLIP loss
# ---------------------------------------------------------------------------------------------

def test_clip_loss_matches_direct_cross_entropy():
    img, txt, scale = leaves(embeds(8, seed=1), embeds(8, seed=2), torch.tensor(math.log(20.0)))
    out = clip_loss(img, txt, scale)
    assert isinstance(out, ClipLossOutput) and out.loss.dtype == torch.float32
    logits = 20.0 * img @ txt.T
    target = torch.arange(8)
    direct = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    torch.testing.assert_close(out.loss, direct)
    torch.testing.assert_close(out.image_to_text_acc, (logits.argmax(1) == target).float().mean())
    torch.testing.assert_close(out.text_to_image_acc, (logits.argmax(0) == target).float().mean())
    identity = clip_loss(img, txt, scale, positives=torch.eye(8, dtype=torch.bool))
    torch.testing.assert_close(identity.loss, out.loss, rtol=0, atol=1e-6)


def test_clip_loss_gradients_reach_both_towers_and_the_scale():
    img, txt, scale = leaves(embeds(6, seed=3), embeds(6, seed=4), torch.tensor(2.0))
    clip_loss(img, txt, scale, positives_from_labels(LABELS[:6])).loss.backward()
    for grad in (img.grad, txt.grad, scale.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_logit_scale_is_exponentiated_and_clamped_at_100():
    img, txt = embeds(5, seed=5), embeds(5, seed=6)
    big = torch.tensor(10.0, requires_grad=True)  # exp(10) > 100
    out = clip_loss(img, txt, big)
    torch.testing.assert_close(out.loss, clip_loss(img, txt, torch.tensor(math.log(100.0))).loss)
    out.loss.backward()
    assert big.grad == 0  # clamped: the scale stops growing


def test_duplicate_captions_3x3_hand_computed():
    """Images 0, 1 share a caption; all embeddings match their caption exactly, scale 10."""
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    emb = torch.stack([e0, e0, e1])  # logits = 10 * [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    scale = torch.tensor(math.log(10.0))
    positives = positives_from_labels(["a", "a", "b"])
    assert positives.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    soft = clip_loss(emb, emb, scale, positives)
    hard = clip_loss(emb, emb, scale)
    eps = math.exp(-10)
    # Row 0: p = [1, 1, e^-10] / (2 + e^-10); target [1/2, 1/2, 0]; KL = log(2 + e^-10) - log 2.
    # Row 2: p_22 = 1 / (1 + 2e^-10). Both directions are identical by symmetry.
    expected_soft = (2 * math.log(1 + eps / 2) + math.log(1 + 2 * eps)) / 3
    expected_hard = (2 * math.log(2 + eps) + math.log(1 + 2 * eps)) / 3  # duplicates negatives
    assert soft.loss.item() == pytest.approx(expected_soft, rel=1e-4, abs=1e-7)
    assert hard.loss.item() == pytest.approx(expected_hard, rel=1e-5)
    assert soft.loss < hard.loss
    assert soft.image_to_text_acc == 1 and soft.text_to_image_acc == 1


def test_soft_targets_match_explicit_formula():
    img, txt = embeds(8, seed=7), embeds(8, seed=8)
    positives = positives_from_labels(LABELS)
    out = clip_loss(img, txt, torch.tensor(math.log(15.0)), positives)

    def direction(logits, pos):
        total = 0.0
        for row, mask in zip(logits.log_softmax(1), pos):
            n = int(mask.sum())
            total += -row[mask].sum() / n - math.log(n)  # soft CE minus uniform-target entropy
        return total / len(logits)

    logits = 15.0 * img @ txt.T
    expected = 0.5 * (direction(logits, positives) + direction(logits.T, positives.T))
    torch.testing.assert_close(out.loss, expected)


def test_hard_negatives_join_the_image_softmax_only():
    img, txt, neg = embeds(4, seed=11), embeds(4, seed=12), embeds(6, seed=13)
    labels = LABELS[:4]
    negative_labels = ["blue circle", "red square", "blue square", "tiny star", "red cross", "green dot"]
    negative_positives = positives_between(labels, negative_labels)
    assert negative_positives.shape == (4, 6) and negative_positives.sum() == 1  # image 1 = "blue square"
    assert negative_positives[1, 2]
    out = clip_loss(img, txt, torch.tensor(math.log(10.0)), positives_from_labels(labels),
                    negative_embeds=neg, negative_positives=negative_positives)
    logits = 10.0 * img @ txt.T
    extended = torch.cat([logits, 10.0 * img @ neg.T], 1)  # (4, 4 + 6)
    positives = positives_from_labels(labels)  # images 0 and 2 are both "red circle"
    image_targets = torch.cat([positives, negative_positives], 1)

    def soft(rows, targets):
        return torch.stack([-(row.log_softmax(0)[mask]).sum() / mask.sum() - mask.sum().float().log()
                            for row, mask in zip(rows, targets)]).mean()

    image_side = soft(extended, image_targets)
    text_side = soft(logits.T, positives.T)  # negatives have no image: this side is untouched
    torch.testing.assert_close(out.loss, 0.5 * (image_side + text_side))
    # no negatives at all, or an empty set, is the plain loss
    plain = clip_loss(img, txt, torch.tensor(math.log(10.0)), positives_from_labels(labels))
    empty = clip_loss(img, txt, torch.tensor(math.log(10.0)), positives_from_labels(labels),
                      negative_embeds=neg[:0], negative_positives=torch.zeros(4, 0, dtype=torch.bool))
    torch.testing.assert_close(empty.loss, plain.loss)
    assert out.loss > plain.loss  # more competitors for every image
    with pytest.raises(ValueError, match="negative_positives"):
        clip_loss(img, txt, torch.tensor(1.0), negative_embeds=neg, negative_positives=negative_positives[:, :2])


def test_positives_validation_and_label_ids():
    img = embeds(3)
    with pytest.raises(ValueError, match="diagonal"):
        clip_loss(img, img, torch.tensor(1.0), torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        clip_loss(img, img, torch.tensor(1.0), torch.ones(4, 4, dtype=torch.bool))
    ids = label_ids(["x", "y", "x", 7])
    assert ids.dtype == torch.int64 and ids[0] == ids[2] != ids[1] and ids[3] == 7
    assert torch.equal(positives_from_labels(torch.tensor([3, 1, 3])),
                       positives_from_labels([3, 1, 3]))
    with pytest.raises(TypeError):
        label_ids([1.5])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NEGATIVES = embeds(5, seed=21)
NEGATIVE_LABELS = ["blue circle", "red circle", "green square", "tiny star", "blue cross"]


def _dist_worker(rank, world, port, out_dir, img, txt, scale, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        results = []
        for bounds, rescale in cases:
            lo, hi = bounds[rank]
            local_img, local_txt, local_scale = leaves(img[lo:hi], txt[lo:hi], scale)
            positives = positives_from_labels(LABELS[lo:hi])
            out = clip_loss(local_img, local_txt, local_scale, positives,
                            rescale_local_grad=rescale)
            out.loss.backward()
            results.append(dict(loss=out.loss.detach(), i2t=out.image_to_text_acc,
                                positives=positives, img_grad=local_img.grad,
                                txt_grad=local_txt.grad, scale_grad=local_scale.grad,
                                ids=label_ids(LABELS[lo:hi])))
        # hard negatives, split unevenly (rank 0 holds 1, rank 1 holds 4)
        lo, hi = [(0, 4), (4, 8)][rank]
        n_lo, n_hi = [(0, 1), (1, 5)][rank]
        local_img, local_neg = leaves(img[lo:hi], NEGATIVES[n_lo:n_hi])
        negative_positives = positives_between(LABELS[lo:hi], NEGATIVE_LABELS[n_lo:n_hi])
        out = clip_loss(local_img, txt[lo:hi], scale, positives_from_labels(LABELS[lo:hi]),
                        negative_embeds=local_neg, negative_positives=negative_positives)
        out.loss.backward()
        results.append(dict(loss=out.loss.detach(), neg_grad=local_neg.grad, img_grad=local_img.grad,
                            negative_positives=negative_positives))
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_gathered_loss_equals_full_batch(tmp_path):
    img, txt, scale = embeds(8, seed=9), embeds(8, seed=10), torch.tensor(math.log(12.0))
    cases = [([(0, 4), (4, 8)], False),  # half the batch each
             ([(0, 3), (3, 8)], True)]  # uneven split, gradient rescaled by the world size
    mp.spawn(_dist_worker, args=(2, _free_port(), tmp_path, img, txt, scale, cases), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    full_img, full_txt, full_scale = leaves(img, txt, scale)
    positives = positives_from_labels(LABELS)
    full = clip_loss(full_img, full_txt, full_scale, positives)
    full.loss.backward()
    for case, (bounds, rescale) in enumerate(cases):
        factor = 2.0 if rescale else 1.0
        for rank, (lo, hi) in enumerate(bounds):
            got = ranks[rank][case]
            torch.testing.assert_close(got["loss"], full.loss.detach())
            torch.testing.assert_close(got["i2t"], full.image_to_text_acc)
            assert torch.equal(got["positives"], positives)
            assert torch.equal(got["ids"], label_ids(LABELS[lo:hi]))  # stable across processes
            torch.testing.assert_close(got["img_grad"], factor * full_img.grad[lo:hi])
            torch.testing.assert_close(got["txt_grad"], factor * full_txt.grad[lo:hi])
            torch.testing.assert_close(got["scale_grad"], full_scale.grad)  # replicated: exact
    # with hard negatives gathered from both ranks: the full-batch loss, gradients on local rows
    full_img, full_neg = leaves(img, NEGATIVES)
    full_negative_positives = positives_between(LABELS, NEGATIVE_LABELS)
    assert full_negative_positives.sum() == 3  # "red circle" appears three times in LABELS
    with_negatives = clip_loss(full_img, txt, scale, positives, negative_embeds=full_neg,
                               negative_positives=full_negative_positives)
    with_negatives.loss.backward()
    for rank, ((lo, hi), (n_lo, n_hi)) in enumerate(zip([(0, 4), (4, 8)], [(0, 1), (1, 5)])):
        got = ranks[rank][len(cases)]
        torch.testing.assert_close(got["loss"], with_negatives.loss.detach())
        assert torch.equal(got["negative_positives"], full_negative_positives)
        torch.testing.assert_close(got["neg_grad"], full_neg.grad[n_lo:n_hi])
        torch.testing.assert_close(got["img_grad"], full_img.grad[lo:hi])


# ---------------------------------------------------------------------------------------------
# Perceptual losses
# ---------------------------------------------------------------------------------------------

class TinyFeatures(nn.Module):
    """A (B, C, H, W) feature map and a (B, N, C) token tensor."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)

    def forward(self, x):
        a = F.relu(self.conv1(x))
        return [a, self.conv2(a).flatten(2).transpose(1, 2)]


def test_perceptual_loss_values_and_frozen_network():
    torch.manual_seed(0)
    net = TinyFeatures().requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss_fn = PerceptualLoss(net)
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    assert loss_fn(target, target).item() == 0.0
    recon = nn.Parameter(target + 0.3 * torch.randn_like(target))
    loss = loss_fn(recon, target)
    expected = 0.0
    for r, t in zip(net(recon.detach()), net(target)):
        dim = 1 if r.ndim == 4 else -1
        expected += (F.normalize(r, dim=dim) - F.normalize(t, dim=dim)).pow(2).sum(dim).mean() / 2
    torch.testing.assert_close(loss, torch.as_tensor(expected))
    assert loss > 0
    optimizer = torch.optim.SGD([recon], lr=1.0)
    loss.backward()
    optimizer.step()
    assert recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="frozen"):
        PerceptualLoss(TinyFeatures())


def test_encoder_block_features_and_builder():
    torch.manual_seed(0)
    encoder = ViTEncoder(ViTConfig(image_size=16, patch_size=4, width=16, depth=3, heads=2))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    features = EncoderBlockFeatures(encoder, [0, 2])(pixels)
    assert [f.shape for f in features] == [(2, 17, 16)] * 2
    out = encoder(pixels)
    torch.testing.assert_close(features[1], torch.cat([out.cls[:, None], out.patches], 1))
    assert all(not block._forward_hooks for block in encoder.blocks)  # hooks are call-scoped
    with pytest.raises(ConfigError, match="out of range"):
        EncoderBlockFeatures(encoder, [3])

    snapshot = build_perceptual_loss(PerceptualConfig(layers=(1,)), encoder)
    assert snapshot.feature_net.encoder is not encoder  # still training: frozen copy
    assert all(p.requires_grad for p in encoder.parameters())
    encoder.requires_grad_(False)
    shared = build_perceptual_loss(PerceptualConfig(), encoder)
    assert shared.feature_net.encoder is encoder and shared.feature_net.layers == (0, 1, 2)
    recon = (pixels + 0.1 * torch.randn_like(pixels)).requires_grad_(True)
    shared(recon, pixels).backward()
    assert recon.grad.abs().sum() > 0


def _random_lpips() -> LPIPSVGG:
    torch.manual_seed(0)
    model = LPIPSVGG()
    for head in model.heads:
        head.weight.abs_()  # real LPIPS heads are non-negative
    return model


def test_lpips_vgg_loads_local_files(tmp_path):
    model = _random_lpips()
    state = {k.replace("heads.", "lin").replace(".weight", ".model.1.weight")
             if k.startswith("heads.") else k: v for k, v in model.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's head: ignored
    torch.save(state, tmp_path / "lpips_vgg.pth")
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(tmp_path / "lpips_vgg.safetensors"))

    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    expected = model(x, y)
    for name in ("lpips_vgg.pth", "lpips_vgg.safetensors"):
        loaded = LPIPSVGG.from_file(tmp_path / name)
        assert not any(p.requires_grad for p in loaded.parameters())
        torch.testing.assert_close(loaded(x, y), expected)
    assert expected > 0 and model(x, x).item() == 0.0
    recon = x.clone().requires_grad_(True)
    model(recon, y).backward()
    assert recon.grad.abs().sum() > 0


def test_lpips_vgg_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "vgg.pth"
    with pytest.raises(UserError, match="nowhere"):
        build_perceptual_loss(PerceptualConfig(lpips_path=str(missing)))
    state = _random_lpips().state_dict()
    del state["heads.0.weight"]
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"bad\.pth.*missing heads\.0\.weight"):
        LPIPSVGG.from_file(tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="junk.pth"):
        LPIPSVGG.from_file(tmp_path / "junk.pth")


# ---------------------------------------------------------------------------------------------
# GAN
# ---------------------------------------------------------------------------------------------

def test_patch_discriminator_shapes():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert PatchDiscriminator(width=8, layers=3)(images).shape == (2, 1, 4, 4)
    disc = PatchDiscriminator.from_config(GANConfig(disc_width=8, disc_layers=2))
    assert disc(images).shape == (2, 1, 8, 8)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    with pytest.raises(ValueError, match="divisible by 4"):
        disc(torch.zeros(2, 3, 30, 30))


def test_r1_penalty_linear_discriminator():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4, requires_grad=True)
    images = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (images * w).sum((1, 2, 3))[:, None] + 0.5  # ∇_x D(x) = w for every image
    penalty = r1_penalty(images, logits)
    torch.testing.assert_close(penalty, w.detach().pow(2).sum())
    penalty.backward()  # create_graph: the penalty trains the discriminator
    torch.testing.assert_close(w.grad, 2 * w.detach())


def test_r1_penalty_matches_finite_differences_and_is_per_image():
    torch.manual_seed(0)
    disc = PatchDiscriminator(width=4, layers=2).double()
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    penalty = r1_penalty(images, disc(images))
    singles = [r1_penalty(x, disc(x)) for x in leaves(*images.detach().split(1))]
    torch.testing.assert_close(penalty, torch.stack(singles).mean())  # GroupNorm: no batch mixing
    x, h = images.detach()[:1].flatten(), 1e-6
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros_like(x)
        step[i] = h
        grad[i] = (disc((x + step).view(1, 3, 8, 8)).sum()
                   - disc((x - step).view(1, 3, 8, 8)).sum()) / (2 * h)
    torch.testing.assert_close(singles[0].detach(), grad.pow(2).sum().float(), rtol=1e-5, atol=0)


def test_gan_losses_match_softplus_formulas():
    real, fake = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    torch.testing.assert_close(generator_loss(fake), -torch.sigmoid(fake).log().mean())
    torch.testing.assert_close(discriminator_loss(real, fake),
                               -torch.sigmoid(real).log().mean()
                               - (1 - torch.sigmoid(fake)).log().mean())


def test_adaptive_gan_weight():
    torch.manual_seed(0)
    last = nn.Linear(4, 4)
    out = last(torch.randn(3, 4))
    rec, gan = out.pow(2).mean(), -3.0 * out.mean()
    g_rec = torch.autograd.grad(rec, last.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, last.weight, retain_graph=True)[0]
    weight = adaptive_gan_weight(rec, gan, last.weight)
    torch.testing.assert_close(weight, g_rec.norm() / (g_gan.norm() + 1e-4))
    assert not weight.requires_grad
    assert adaptive_gan_weight(rec, gan, last.weight, max_weight=1e-3) == 1e-3


# ---------------------------------------------------------------------------------------------
# Pixel metrics and configs
# ---------------------------------------------------------------------------------------------

def test_psnr_and_mse():
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    assert psnr(target, target).item() == pytest.approx(100.0, abs=1e-3)
    signs = torch.randint(0, 2, target.shape).float() * 2 - 1
    deltas = torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)
    recon = target + signs * deltas  # per-image MSE = delta² on [-1, 1], delta²/4 on [0, 1]
    expected = sum(10 * math.log10(4 / d ** 2) for d in (0.1, 0.2)) / 2
    assert psnr(recon, target).item() == pytest.approx(expected, rel=1e-5)
    assert mse_loss(recon, target).item() == pytest.approx((0.01 + 0.04) / 2, rel=1e-5)


def test_config_validation():
    GANConfig().validate()
    PerceptualConfig().validate()
    for bad in (dict(disc_lr_mult=0.0), dict(disc_layers=0), dict(r1_weight=-1.0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            GANConfig(**bad).validate()
    with pytest.raises(ConfigError, match="distinct"):
        PerceptualConfig(layers=(1, 1)).validate()
    with pytest.raises(ConfigError, match="lpips_path"):
        PerceptualConfig(layers=(1,), lpips_path="vgg.pth").validate()
    cfg = config_from_dict(PerceptualConfig, {"layers": [0, 2], "lpips_path": None})
    assert cfg.layers == (0, 2) and cfg.lpips_path is None
