"""BSQ quantizer: exact MSB-first indices, straight-through quantization, entropies vs brute force."""
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from mmcore.config import ConfigError, config_from_dict
from tokenizer import bsq
from tokenizer.bsq import (
    BSQConfig, BSQOutput, BSQuantizer, bits_to_group_indices, bits_to_indices, bits_to_quantized,
    group_entropies, group_indices_to_bits, group_indices_to_indices, group_indices_to_quantized,
    group_log_probs, indices_to_bits, indices_to_group_indices, indices_to_quantized, quantize,
    used_code_entropy_bits,
)

LN2 = math.log(2)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def all_codes(L):
    """(2**L, L) explicit codebook, row j = code of index j (MSB first)."""
    bits = torch.tensor(list(itertools.product([0, 1], repeat=L)), dtype=torch.bool)
    return bits, bits_to_quantized(bits, torch.float64)


def entropy(p):
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def brute_force(u, tau):
    """Full softmax over all 2**L codes: (q (N, 2**L), per-sample H, codebook H) in float64."""
    L = u.shape[-1]
    _, codes = all_codes(L)
    q = torch.softmax(2 * tau * u.double().reshape(-1, L) @ codes.T, -1)
    return q, entropy(q).mean(), entropy(q.mean(0))


# ---------------------------------------------------------------------------------------------
# indices
# ---------------------------------------------------------------------------------------------

def test_msb_first_examples():
    assert bits_to_indices(torch.tensor([1, 0, 0])).item() == 4
    assert bits_to_indices(torch.tensor([0, 0, 1])).item() == 1
    assert bits_to_indices(torch.tensor([True, False, True, True])).item() == 11
    assert indices_to_bits(torch.tensor(4), 3).tolist() == [True, False, False]
    bits = torch.tensor([1, 0, 0, 1])  # groups of 2: [10, 01] -> [2, 1]; full index 9
    assert bits_to_group_indices(bits, 2).tolist() == [2, 1]
    assert group_indices_to_indices(torch.tensor([2, 1]), 2).item() == 9
    assert indices_to_group_indices(torch.tensor(9), 4, 2).tolist() == [2, 1]


@pytest.mark.parametrize("L", [8, 28, 62, 63])
def test_index_bits_round_trip_matches_python_ints(L):
    rng = random.Random(L)
    rows = [[rng.randint(0, 1) for _ in range(L)] for _ in range(64)]
    rows[0], rows[1] = [1] * L, [0] * L
    bits = torch.tensor(rows, dtype=torch.bool)
    idx = bits_to_indices(bits)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [int("".join(map(str, r)), 2) for r in rows]
    assert torch.equal(indices_to_bits(idx, L), bits)


def test_exact_indices_above_float32_range_for_28_bits():
    rng = random.Random(1)
    want = [rng.randrange(1 << 24, 1 << 28) | 1 for _ in range(200)]  # odd: not float32-exact
    bits = torch.tensor([[int(c) for c in format(v, "028b")] for v in want], dtype=torch.bool)
    assert bits_to_indices(bits).tolist() == want
    # the float32 sum of powers of two that this replaces gets (odd) indices >= 2**24 wrong
    weights = 2.0 ** torch.arange(27, -1, -1, dtype=torch.float32)
    assert (bits.float() * weights).sum(-1).long().tolist() != want


@pytest.mark.parametrize("L,g", [(8, 1), (8, 4), (28, 7), (28, 14), (62, 31), (12, 12)])
def test_group_round_trips(L, g):
    gen = torch.Generator().manual_seed(L * 100 + g)
    bits = torch.randint(0, 2, (3, 5, L), generator=gen).bool()
    gi = bits_to_group_indices(bits, g)
    assert gi.shape == (3, 5, L // g) and gi.dtype == torch.int64
    assert int(gi.min()) >= 0 and int(gi.max()) < 2 ** g
    assert torch.equal(group_indices_to_bits(gi, g), bits)
    idx = group_indices_to_indices(gi, g)
    assert torch.equal(idx, bits_to_indices(bits))
    assert torch.equal(indices_to_group_indices(idx, L, g), gi)
    assert torch.equal(group_indices_to_quantized(gi, g), indices_to_quantized(idx, L))


def test_float_indices_and_bad_groups_rejected():
    with pytest.raises(TypeError, match="integer"):
        indices_to_bits(torch.tensor([3.0]), 4)
    with pytest.raises(ValueError, match="divisible"):
        bits_to_group_indices(torch.zeros(6, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="num_bits"):
        bits_to_indices(torch.zeros(64, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------

def test_quantized_is_unit_norm_code_even_with_zeros():
    L = 16
    u = unit(64, L)
    u[0] = 0.0  # all zeros
    u[1, ::2] = 0.0
    u[2, 1::2] = -0.0
    q, bits = quantize(u)
    assert torch.all(q.abs() == 1 / math.sqrt(L))
    assert torch.allclose(q.norm(dim=-1), torch.ones(64), atol=1e-6, rtol=0)
    assert torch.all(q[0] < 0) and not torch.any(bits[0])  # sign(0) = -1, bit 0 (as the released code)
    assert not torch.any(bits[2, 1::2])  # so does -0.0
    assert torch.equal(q, bits_to_quantized(bits))  # forward value is exactly the code
    assert torch.equal(q, indices_to_quantized(bits_to_indices(bits), L))
    assert torch.equal(bits, u > 0)


def test_straight_through_gradient_is_identity():
    u = unit(4, 3, 8).requires_grad_()
    w = torch.randn(4, 3, 8)
    q, _ = quantize(u)
    (w * q).sum().backward()
    assert torch.equal(u.grad, w)


def test_commitment_value_and_loss_composition():
    L = 8
    u = unit(10, L).requires_grad_()
    cfg = BSQConfig(num_bits=L, group_size=4, commit_weight=0.25, entropy_weight=0.0)
    out = BSQuantizer(cfg)(u)
    # for unit u: ‖û - u‖² = 2 - 2 <û, u> = 2 - 2 ‖u‖₁ / sqrt(L)
    want = (2 - 2 * u.detach().abs().sum(-1) / math.sqrt(L)).mean()
    assert torch.allclose(out.commit_loss, want, atol=1e-6)
    assert torch.allclose(out.loss, 0.25 * out.commit_loss)
    out.loss.backward()  # only the commitment term: grad = β · 2(u - û)/N
    assert torch.allclose(u.grad, 0.25 * 2 * (u.detach() - out.quantized.detach()) / 10, atol=1e-7)


def test_forward_output_shapes_and_loss():
    cfg = BSQConfig(num_bits=12, group_size=3, inv_temperature=2.0, gamma=0.5,
                    commit_weight=0.1, entropy_weight=0.3)
    u = unit(2, 3, 5, 12).requires_grad_()
    out = BSQuantizer(cfg)(u)
    assert isinstance(out, BSQOutput)
    assert out.quantized.shape == (2, 3, 5, 12) and out.quantized.dtype == torch.float32
    assert out.bits.shape == (2, 3, 5, 12) and out.bits.dtype == torch.bool
    assert out.group_indices.shape == (2, 3, 5, 4) and out.group_indices.dtype == torch.int64
    for name in ("loss", "per_sample_entropy", "codebook_entropy", "commit_loss",
                 "used_entropy_bits"):
        assert getattr(out, name).shape == ()
    want = 0.3 * (out.per_sample_entropy - 0.5 * out.codebook_entropy) + 0.1 * out.commit_loss
    assert torch.allclose(out.loss, want)
    out.loss.backward()
    assert torch.isfinite(u.grad).all()
    assert torch.equal(BSQuantizer(cfg).decode_group_indices(out.group_indices),
                       out.quantized.detach())
    with pytest.raises(ValueError, match="num_bits=12"):
        BSQuantizer(cfg)(unit(3, 8))


# ---------------------------------------------------------------------------------------------
# entropies
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.5, 3.0])
def test_group_mode_with_g_equal_L_matches_brute_force(tau):
    u = unit(2, 7, 5, seed=3)  # leading dims are all averaged over
    _, h_sample, h_book = brute_force(u, tau)
    ps, cb = group_entropies(u, 5, tau, "group")
    assert ps.item() == pytest.approx(h_sample.item(), abs=1e-5)
    assert cb.item() == pytest.approx(h_book.item(), abs=1e-5)


@pytest.mark.parametrize("g", [1, 2, 3])
def test_group_mode_with_g_below_L_matches_product_of_group_marginals(g):
    L, tau = 6, 2.0
    u = unit(40, L, seed=g)
    q, h_sample, h_book_full = brute_force(u, tau)
    G = L // g
    # marginal of each group under the batch-mean distribution, from the explicit codebook
    code_groups = bits_to_group_indices(all_codes(L)[0], g)  # (2**L, G)
    mean_q = q.mean(0)
    marginals = [torch.zeros(2 ** g, dtype=torch.float64).index_add_(0, code_groups[:, k], mean_q)
                 for k in range(G)]
    product = torch.ones(2 ** L, dtype=torch.float64)  # product distribution over all codes
    for k in range(G):
        product = product * marginals[k][code_groups[:, k]]
    ps, cb = group_entropies(u, g, tau, "group")
    assert ps.item() == pytest.approx(h_sample.item(), abs=1e-5)  # q factorises exactly
    assert cb.item() == pytest.approx(entropy(product).item(), abs=1e-5)
    assert cb.item() >= h_book_full.item() - 1e-6  # sub-additivity: an upper bound


def test_bit_marginal_is_sigmoid_and_analytical_equals_group_g1():
    L, tau = 5, 1.7
    u = unit(30, L, seed=4)
    q, _, _ = brute_force(u, tau)
    bits = all_codes(L)[0].double()  # (2**L, L)
    assert torch.allclose(q @ bits, torch.sigmoid(4 * tau * u.double() / math.sqrt(L)), atol=1e-6)
    assert torch.allclose(group_log_probs(u, 1, tau)[..., 1].exp(), (q @ bits).float(), atol=1e-6)

    ua = u.clone().requires_grad_()
    ug = u.clone().requires_grad_()
    pa, ca = group_entropies(ua, 1, tau, "analytical")
    pg, cg = group_entropies(ug, 1, tau, "group")
    assert torch.allclose(pa, pg, atol=1e-6) and torch.allclose(ca, cg, atol=1e-6)
    (pa - 0.7 * ca).backward()
    (pg - 0.7 * cg).backward()
    assert torch.allclose(ua.grad, ug.grad, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        group_entropies(u, 1, tau, "exact")


@pytest.mark.parametrize("g,mode", [(6, "group"), (3, "group"), (1, "group"), (2, "analytical")])
def test_codebook_entropy_is_maximal_for_uniform_use_of_all_codes(g, mode):
    L = 6
    codes = all_codes(L)[1].float()  # every code once: each is its own unit vector
    cfg = BSQConfig(num_bits=L, group_size=g, entropy_mode=mode, inv_temperature=1.3)
    out = BSQuantizer(cfg)(codes)
    assert out.codebook_entropy.item() == pytest.approx(L * LN2, abs=1e-5)  # nats
    assert out.used_entropy_bits.item() == pytest.approx(cfg.max_entropy_bits, abs=1e-5)
    assert torch.equal(out.group_indices, indices_to_group_indices(torch.arange(2 ** L), L, g))


def test_used_entropy_bits():
    gi = torch.tensor([[0, 5], [0, 5], [1, 5], [2, 5]])  # group 0: p = (1/2, 1/4, 1/4)
    assert used_code_entropy_bits(gi, 3).tolist() == pytest.approx([1.5, 0.0])
    big = torch.tensor([[0, 1], [1, 1], [1 << 20, 1], [7, 1]])  # unique() path (2 * 2**24 bins)
    assert used_code_entropy_bits(big, 24).tolist() == pytest.approx([2.0, 0.0])


def test_codebook_entropy_averages_across_ranks(monkeypatch):
    """Simulated 2-rank all-reduce: same value as one big batch; gradient only via local rows."""
    L, g, tau = 6, 3, 2.0
    ua, ub = unit(5, L, seed=7), unit(9, L, seed=8)
    other = group_log_probs(ub, g, tau).exp().sum(0)  # rank B's contribution, (G, C)
    other_packed = torch.cat([other.flatten(), torch.tensor([9.0])])

    def fake_all_reduce(t, *args, **kwargs):
        t.add_(other_packed)
    monkeypatch.setattr(bsq.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(bsq.dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(bsq.dist, "all_reduce", fake_all_reduce)

    xa = ua.clone().requires_grad_()
    _, cb = group_entropies(xa, g, tau, "group")
    cb.backward()
    monkeypatch.undo()
    both = torch.cat([ua, ub]).requires_grad_()
    _, cb_both = group_entropies(both, g, tau, "group")
    cb_both.backward()
    assert cb.item() == pytest.approx(cb_both.item(), abs=1e-6)
    assert torch.allclose(xa.grad, both.grad[:5], atol=1e-6)


def test_real_process_group_collective_path(tmp_path, monkeypatch):
    """A real 1-rank gloo group, with the all-reduce path forced: same values as no group."""
    import torch.distributed as dist
    u = unit(8, 4)
    want = [group_entropies(u, 2, 1.0, mode) for mode in ("group", "analytical")]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(bsq.dist, "get_world_size", lambda *a, **k: 2)
        for mode, (ps, cb) in zip(("group", "analytical"), want):
            x = u.clone().requires_grad_()
            got_ps, got_cb = group_entropies(x, 2, 1.0, mode)
            got_cb.backward()
            assert got_ps.item() == pytest.approx(ps.item(), abs=1e-6)
            assert got_cb.item() == pytest.approx(cb.item(), abs=1e-6)
            assert torch.isfinite(x.grad).all()
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_bits=10, group_size=4), "divisible"),
    (dict(num_bits=18, group_size=18), "too large for entropy_mode='group'"),
    (dict(num_bits=0, group_size=1), "num_bits"),
    (dict(num_bits=64, group_size=1), "int64"),
    (dict(num_bits=8, group_size=0), "group_size"),
    (dict(inv_temperature=0.0), "inv_temperature"),
    (dict(gamma=-1.0), "gamma"),
    (dict(commit_weight=-0.1), "commit_weight"),
    (dict(entropy_mode="exact"), "entropy_mode"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BSQConfig(**kwargs).validate()
    with pytest.raises(ConfigError):
        BSQuantizer(BSQConfig(**kwargs))


def test_config_valid_cases_and_schema_loading():
    BSQConfig(num_bits=18, group_size=18, entropy_mode="analytical").validate()  # no 2**g tensor
    BSQConfig(num_bits=62, group_size=2).validate()
    cfg = config_from_dict(BSQConfig, {"num_bits": 18, "group_size": 9, "gamma": 1})
    assert cfg.num_groups == 2 and cfg.gamma == 1.0 and cfg.max_entropy_bits == 18
    with pytest.raises(ConfigError, match="divisible"):
        config_from_dict(BSQConfig, {"num_bits": 18, "group_size": 4})
