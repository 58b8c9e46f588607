"""Binary Spherical Quantization (BSQ; Zhao et al. 2024), as used by the QLIP tokenizer.

The caller projects features to ``L`` dims and L2-normalises them; this module quantizes each
unit vector ``u`` to ``û = sign(u) / sqrt(L)``, the nearest point of the implicit codebook
``{±1/sqrt(L)}^L`` (``2**L`` codes, none stored). Because every code has norm 1 the quantization
error is bounded (``‖û - u‖² = 2 - 2‖u‖₁/sqrt(L) <= 2``), which is why BSQ trains stably without
codebook losses. Gradients pass straight through (identity w.r.t. ``u``).

Conventions (shared with the released checkpoints, fixed here for everything downstream):

* ``bit = 1  <=>  u > 0`` (so ``sign(0) = -1``, as the released ``bsq.py``'s ``torch.where(z > 0,
  1, -1)``); bits and ``û`` always agree and ``‖û‖ = 1``.
* Code indices are MSB-first: channel 0 is the most significant bit; ``[1, 0, 0] -> 4``.
  The ``L`` bits split into ``G = L / g`` contiguous groups, each indexed MSB-first in
  ``[0, 2**g)``; group 0 holds the most significant bits of the full index.
* Indices are computed in int64 (exact up to ``L = 63``). Summing float32 powers of two, as the
  released code does, rounds every index >= 2**24.

Entropy regulariser: soft assignments ``q(c|u) ∝ exp(2τ<u, c>)``. Since ``<u, c>`` is a sum over
coordinates, ``q`` factorises *exactly* over coordinates, so the per-sample entropy is the same in
every mode. Only the codebook entropy ``H(E_batch[q])`` needs an approximation: it is computed
from the batch-mean marginals of each group (``"group"`` mode, exact softmax over ``2**g`` sub-codes)
or of each bit (``"analytical"``: restricting the softmax to one coordinate gives
``q(bit_i = 1) = e^{a}/(e^{a} + e^{-a})`` with ``a = 2τ u_i/sqrt(L)``, i.e. ``sigmoid(4τ u_i/sqrt(L))``;
identical to group mode with ``g = 1``). Summing marginal entropies upper-bounds the full codebook
entropy (sub-additivity) and is tight when groups are independent over the batch.
All soft entropies are in **nats**; the hard ``used_entropy_bits`` metric is in **bits**.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmcore.config import ConfigError

MAX_BITS = 63  # code indices are int64
MAX_SOFT_GROUP_SIZE = 16  # group mode materialises (tokens, G, 2**g) probabilities
_BINCOUNT_LIMIT = 1 << 24  # above this many (group, code) bins, count with torch.unique instead


@dataclasses.dataclass
class BSQConfig:
    """BSQ quantizer settings. Loss defaults are placeholders; the model config sets real ones."""

    num_bits: int = 28  # L: code length = dimension of the unit vectors
    group_size: int = 4  # g: bits per token group (L = G * g); tokens for the AR model
    inv_temperature: float = 1.0  # τ in q(c|u) ∝ exp(2τ<u, c>)
    gamma: float = 1.0  # weight of the codebook entropy inside the entropy term
    entropy_mode: Literal["group", "analytical"] = "group"
    commit_weight: float = 0.0  # β for the commitment term ‖sg(û) - u‖²
    entropy_weight: float = 0.1  # weight of (per-sample entropy - γ codebook entropy)

    @property
    def num_groups(self) -> int:
        return self.num_bits // self.group_size

    @property
    def max_entropy_bits(self) -> float:
        """Largest possible codebook / used-code entropy, in bits (``log2`` of the codebook size)."""
        return float(self.num_bits)

    def validate(self) -> None:
        L, g = self.num_bits, self.group_size
        if not 1 <= L <= MAX_BITS:
            raise ConfigError(f"BSQConfig.num_bits must be in [1, {MAX_BITS}] so code indices fit "
                              f"in int64, got {L}")
        if not 1 <= g <= L:
            raise ConfigError(f"BSQConfig.group_size must be in [1, num_bits={L}], got {g}")
        if L % g:
            raise ConfigError(f"BSQConfig.num_bits ({L}) must be divisible by group_size ({g})")
        if self.entropy_mode not in ("group", "analytical"):
            raise ConfigError(f"BSQConfig.entropy_mode must be 'group' or 'analytical', "
                              f"got {self.entropy_mode!r}")
        if self.entropy_mode == "group" and g > MAX_SOFT_GROUP_SIZE:
            raise ConfigError(f"BSQConfig.group_size={g} is too large for entropy_mode='group' "
                              f"(it materialises 2**group_size = {2 ** g} sub-code probabilities per "
                              f"token and group; max {MAX_SOFT_GROUP_SIZE}); use a smaller "
                              f"group_size or entropy_mode='analytical'")
        if not self.inv_temperature > 0:
            raise ConfigError(f"BSQConfig.inv_temperature must be > 0, got {self.inv_temperature}")
        for name in ("gamma", "commit_weight", "entropy_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"BSQConfig.{name} must be >= 0, got {getattr(self, name)}")


class BSQOutput(NamedTuple):
    """Result of :meth:`BSQuantizer.forward` for input ``u`` of shape ``(..., L)``."""

    quantized: torch.Tensor  # (..., L) u.dtype, ±1/sqrt(L), straight-through gradient to u
    bits: torch.Tensor  # (..., L) bool, bit i = (u_i > 0), channel 0 = MSB
    group_indices: torch.Tensor  # (..., G) int64 in [0, 2**g), MSB-first within each group
    loss: torch.Tensor  # () float32: entropy_weight*(per_sample - γ*codebook) + β*commit
    per_sample_entropy: torch.Tensor  # () float32 nats, mean over tokens of Σ_groups H(q_group)
    codebook_entropy: torch.Tensor  # () float32 nats, Σ_groups H(mean over tokens [all ranks])
    commit_loss: torch.Tensor  # () float32, unweighted mean over tokens of ‖sg(û) - u‖²
    used_entropy_bits: torch.Tensor  # () float32 bits, Σ_groups entropy of hard codes (detached)


# ---------------------------------------------------------------------------------------------
# Bits <-> indices <-> quantized vectors (pure, exact int64)
# ---------------------------------------------------------------------------------------------

def _check_bits(num_bits: int) -> None:
    if not 1 <= num_bits <= MAX_BITS:
        raise ValueError(f"num_bits must be in [1, {MAX_BITS}] for int64 indices, got {num_bits}")


def _check_int(t: torch.Tensor, what: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{what} must be an integer tensor, got {t.dtype} (floats round indices "
                        f">= 2**24)")


def _num_groups(num_bits: int, group_size: int) -> int:
    if group_size < 1 or num_bits % group_size:
        raise ValueError(f"num_bits ({num_bits}) must be divisible by group_size ({group_size})")
    return num_bits // group_size


def _msb_shifts(n: int, step: int, device) -> torch.Tensor:
    """Shift amounts ``[(n-1)*step, ..., step, 0]``: position 0 is the most significant."""
    return torch.arange(n - 1, -1, -1, device=device, dtype=torch.int64) * step


def bits_to_indices(bits: torch.Tensor) -> torch.Tensor:
    """(..., L) bits in {0, 1} (bool or int) -> (..., ) int64 code index, channel 0 = MSB."""
    L = bits.shape[-1]
    _check_bits(L)
    weights = torch.ones(L, dtype=torch.int64, device=bits.device) << _msb_shifts(L, 1, bits.device)
    return (bits.to(torch.int64) * weights).sum(-1)  # disjoint powers of two: exact, no carries


def indices_to_bits(indices: torch.Tensor, num_bits: int) -> torch.Tensor:
    """(...,) integer indices in [0, 2**L) -> (..., L) bool bits, MSB first (higher bits dropped)."""
    _check_bits(num_bits)
    _check_int(indices, "indices")
    shifts = _msb_shifts(num_bits, 1, indices.device)
    return ((indices.to(torch.int64).unsqueeze(-1) >> shifts) & 1).bool()


def bits_to_group_indices(bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., L) bits -> (..., G) int64 group indices in [0, 2**g); group k holds bits [k*g, (k+1)*g)."""
    G = _num_groups(bits.shape[-1], group_size)
    return bits_to_indices(bits.unflatten(-1, (G, group_size)))


def group_indices_to_bits(group_indices: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., G) group indices -> (..., G*g) bool bits."""
    return indices_to_bits(group_indices, group_size).flatten(-2)


def group_indices_to_indices(group_indices: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., G) group indices -> (...,) int64 full code index (group 0 most significant)."""
    _check_int(group_indices, "group_indices")
    G = group_indices.shape[-1]
    _check_bits(G * group_size)
    shifts = _msb_shifts(G, group_size, group_indices.device)
    return (group_indices.to(torch.int64) << shifts).sum(-1)


def indices_to_group_indices(indices: torch.Tensor, num_bits: int, group_size: int) -> torch.Tensor:
    """(...,) full code index -> (..., G) int64 group indices."""
    _check_bits(num_bits)
    _check_int(indices, "indices")
    G = _num_groups(num_bits, group_size)
    shifts = _msb_shifts(G, group_size, indices.device)
    return (indices.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << group_size) - 1)


def bits_to_quantized(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., L) bits -> (..., L) code vector with entries ±1/sqrt(L) (bit 1 -> +)."""
    scale = 1.0 / math.sqrt(bits.shape[-1])
    return (bits.to(dtype) * 2 - 1) * scale


def indices_to_quantized(indices: torch.Tensor, num_bits: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(...,) code index -> (..., L) code vector."""
    return bits_to_quantized(indices_to_bits(indices, num_bits), dtype)


def group_indices_to_quantized(group_indices: torch.Tensor, group_size: int,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., G) group indices (e.g. sampled by the AR model) -> (..., L) code vector."""
    return bits_to_quantized(group_indices_to_bits(group_indices, group_size), dtype)


def quantize(unit_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., L) unit vectors -> (quantized (..., L) same dtype, bits (..., L) bool).

    The forward value is exactly the code vector: ``code + (u - u.detach())`` adds an exact zero
    (``x - x == 0``), unlike ``u + (code - u).detach()`` which rounds; its gradient is the identity.
    """
    bits = unit_vectors > 0  # sign(0) = -1 (the released code's rule); the code has no zero entry
    code = bits_to_quantized(bits, unit_vectors.dtype)
    return code + (unit_vectors - unit_vectors.detach()), bits


# ---------------------------------------------------------------------------------------------
# Soft-assignment entropies
# ---------------------------------------------------------------------------------------------

def subcode_table(group_size: int, num_bits: int, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(2**g, g) all sub-codes of one group, row j = code of group index j, entries ±1/sqrt(L).

    The scale is 1/sqrt(L) (not 1/sqrt(g)): a sub-code is a slice of a full-length code, so the
    group logits add up to the full-codebook logits.
    """
    idx = torch.arange(1 << group_size, device=device)
    return (indices_to_bits(idx, group_size).to(dtype) * 2 - 1) / math.sqrt(num_bits)


def group_log_probs(unit_vectors: torch.Tensor, group_size: int,
                    inv_temperature: float) -> torch.Tensor:
    """(..., L) -> (..., G, 2**g) float32 log q(sub-code | u_group), exact softmax per group."""
    L = unit_vectors.shape[-1]
    G = _num_groups(L, group_size)
    table = subcode_table(group_size, L, unit_vectors.device)  # (C, g)
    u = unit_vectors.float().unflatten(-1, (G, group_size))  # (..., G, g)
    logits = 2.0 * inv_temperature * (u @ table.T)  # (..., G, C)
    return F.log_softmax(logits, dim=-1)


def bit_logits(unit_vectors: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """(..., L) -> (..., L) float32 logit of q(bit_i = 1 | u) = sigmoid(4τ u_i / sqrt(L))."""
    L = unit_vectors.shape[-1]
    return (4.0 * inv_temperature / math.sqrt(L)) * unit_vectors.float()


def distributed_mean(x: torch.Tensor, across_ranks: bool = True) -> torch.Tensor:
    """Mean over dim 0 of ``x`` across all ranks (weighted by each rank's row count).

    ``across_ranks=False`` (or no process group) gives the local mean and no collective.

    Gradient flows only through this rank's rows: the other ranks' sums enter as constants, and
    each rank back-propagates its own share of the (identical) global entropy.
    """
    local_sum = x.sum(0)
    if not across_ranks or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_sum / x.shape[0]
    packed = torch.cat([local_sum.detach().flatten(), local_sum.new_tensor([x.shape[0]])])
    dist.all_reduce(packed)  # one collective: sums and counts
    total, count = packed[:-1].view_as(local_sum), packed[-1]
    return (local_sum + (total - local_sum.detach())) / count


def _entropy_of_probs(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dim; 0·log 0 = 0 with finite gradients."""
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)


def group_entropies(unit_vectors: torch.Tensor, group_size: int, inv_temperature: float,
                    mode: str = "group", across_ranks: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(per_sample_entropy, codebook_entropy), both () float32 in nats.

    ``per_sample`` = mean over tokens (all leading dims) of Σ_groups H(q_group(·|u)) — exact for
    the full codebook in both modes since q factorises. ``codebook`` = Σ_groups H(mean of
    q_group over tokens and ranks); ``mode="analytical"`` uses per-bit groups (g = 1) in closed
    form and ignores ``group_size``.
    """
    if mode == "group":
        logp = group_log_probs(unit_vectors, group_size, inv_temperature)
        logp = logp.reshape(-1, *logp.shape[-2:])  # (N, G, C)
        p = logp.exp()
        per_sample = -(p * logp).sum(-1).sum(-1).mean()
        return per_sample, _entropy_of_probs(distributed_mean(p, across_ranks)).sum()
    if mode == "analytical":
        x = bit_logits(unit_vectors, inv_temperature).reshape(-1, unit_vectors.shape[-1])  # (N, L)
        p1 = torch.sigmoid(x)
        # H_b = -p log p - (1-p) log(1-p) with log p = -softplus(-x), log(1-p) = -softplus(x)
        per_sample = (p1 * F.softplus(-x) + (1 - p1) * F.softplus(x)).sum(-1).mean()
        mean_p1 = distributed_mean(p1, across_ranks)  # (L,)
        return per_sample, _entropy_of_probs(torch.stack([mean_p1, 1 - mean_p1], -1)).sum()
    raise ValueError(f"entropy mode must be 'group' or 'analytical', got {mode!r}")


@torch.no_grad()
def used_code_entropy_bits(group_indices: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., G) hard group indices -> (G,) float32 empirical entropy per group, in bits.

    Measured on this rank's tokens only (a logging metric; no collective). At most
    ``min(g, log2(tokens))`` per group.
    """
    G = group_indices.shape[-1]
    gi = group_indices.reshape(-1, G).to(torch.int64)  # (N, G)
    n, C = gi.shape[0], 1 << group_size
    if G * C <= _BINCOUNT_LIMIT:
        keys = gi + torch.arange(G, device=gi.device) * C
        counts = torch.bincount(keys.flatten(), minlength=G * C).view(G, C).float()
        p = counts / n
        return -torch.special.xlogy(p, p).sum(-1) / math.log(2)
    out = []
    for k in range(G):
        p = torch.unique(gi[:, k], return_counts=True)[1].float() / n
        out.append(-(p * p.log2()).sum())
    return torch.stack(out)


def commitment_loss(quantized: torch.Tensor, unit_vectors: torch.Tensor) -> torch.Tensor:
    """() float32 mean over tokens of ‖sg(û) - u‖² (squared norm over the L dims)."""
    diff = quantized.detach().float() - unit_vectors.float()
    return diff.pow(2).sum(-1).mean()


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------

class BSQuantizer(nn.Module):
    """Binary spherical quantizer with the entropy / commitment regulariser. No parameters."""

    def __init__(self, config: BSQConfig):
        super().__init__()
        config.validate()
        self.config = config

    @property
    def num_groups(self) -> int:
        return self.config.num_groups

    def extra_repr(self) -> str:
        c = self.config
        return (f"num_bits={c.num_bits}, group_size={c.group_size}, mode={c.entropy_mode}, "
                f"inv_temperature={c.inv_temperature}, gamma={c.gamma}")

    def forward(self, unit_vectors: torch.Tensor) -> BSQOutput:
        """(..., L) L2-normalised vectors -> :class:`BSQOutput` (normalisation is not checked)."""
        c = self.config
        if unit_vectors.shape[-1] != c.num_bits:
            raise ValueError(f"expected last dim num_bits={c.num_bits}, got shape "
                             f"{tuple(unit_vectors.shape)}")
        quantized, bits = quantize(unit_vectors)
        group_indices = bits_to_group_indices(bits, c.group_size)
        # With entropy_weight = 0 the entropies are metrics only: skip their (large) graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and c.entropy_weight > 0):
            # in eval mode no collective: one rank may evaluate while the others wait
            per_sample, codebook = group_entropies(unit_vectors, c.group_size, c.inv_temperature,
                                                   c.entropy_mode, across_ranks=self.training)
        commit = commitment_loss(quantized, unit_vectors)
        loss = c.entropy_weight * (per_sample - c.gamma * codebook) + c.commit_weight * commit
        used = used_code_entropy_bits(group_indices, c.group_size).sum()
        return BSQOutput(quantized, bits, group_indices, loss, per_sample, codebook, commit, used)

    def decode_group_indices(self, group_indices: torch.Tensor,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(..., G) group indices -> (..., L) code vectors, e.g. for decoding AR samples."""
        return group_indices_to_quantized(group_indices, self.config.group_size, dtype)

    def decode_indices(self, indices: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(...,) full code indices -> (..., L) code vectors."""
        return indices_to_quantized(indices, self.config.num_bits, dtype)
