"""Vision Transformer trunks for the QLIP tokenizer: the encoder (with [CLS]) and the pixel decoder.

Blocks are pre-norm (``x + attn(norm(x))``, ``x + mlp(norm(x))``) with three optional EVA-02
features, each a config flag because the released QLIP encoders start from EVA-CLIP weights:

* **2D RoPE** on patch tokens: the head dim is split in two halves, one rotated by the patch's row
  and one by its column, so ``<q_i, k_j>`` depends on the *relative* 2D offset of the patches (on
  top of the learned absolute position embedding). The [CLS] token gets angle 0 (no rotation).
* **SwiGLU MLP** (``w3(silu(w1 x) * w2 x)``) instead of ``fc2(gelu(fc1 x))``. EVA-02 uses hidden
  size ``int(width * 8/3)`` so that its parameter count matches a GELU MLP of ratio 4.
* **sub-LN**: an extra LayerNorm on the attention output (before the output projection) and on
  the MLP hidden activations (before the down projection); it keeps activation scales stable in
  deep, wide models.

Attention uses :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
kernels where the device has them). The same :class:`Block` serves the causal text encoder.

Token layout everywhere: patches in row-major order (``index = row * grid_w + col``); a patch
vector is ordered ``(p q c)`` (row within the patch, column within the patch, RGB channel).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from mmcore.config import ConfigError


@dataclasses.dataclass
class ViTConfig:
    """One ViT trunk (encoder or decoder). ``image_size`` and ``patch_size`` fix the token grid."""

    image_size: int = 32
    patch_size: int = 4
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0  # hidden = int(width * mlp_ratio); EVA-02 SwiGLU uses 8/3
    swiglu: bool = False
    sub_ln: bool = False
    rope: bool = False  # 2D RoPE on patch tokens
    rope_base: float = 10000.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    # "trunc_normal": ViT/CLIP's std-0.02 weights (the released widths, 768+); "fan_in": PyTorch's
    # default fan-in-scaled init. At width 128 std 0.02 is ~4x too small: a one-batch overfit test
    # reached 22.5 dB in 100 steps with it and 26.7 dB with fan_in.
    init: Literal["trunc_normal", "fan_in"] = "trunc_normal"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def validate(self, name: str = "ViTConfig") -> None:
        for field in ("image_size", "patch_size", "width", "depth", "heads"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{name}.{field} must be >= 1, got {getattr(self, field)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{name}.image_size ({self.image_size}) must be divisible by "
                              f"patch_size ({self.patch_size})")
        if self.width % self.heads:
            raise ConfigError(f"{name}.width ({self.width}) must be divisible by heads "
                              f"({self.heads})")
        if self.rope and self.head_dim % 4:
            raise ConfigError(f"{name}: 2D RoPE needs head_dim = width/heads divisible by 4 "
                              f"(two axes x pairs of dims), got {self.head_dim}")
        if self.mlp_hidden < 1:
            raise ConfigError(f"{name}.mlp_ratio ({self.mlp_ratio}) gives an empty MLP")
        if not self.rope_base > 1:
            raise ConfigError(f"{name}.rope_base must be > 1, got {self.rope_base}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"{name}.layer_norm_eps must be > 0, got {self.layer_norm_eps}")


# ---------------------------------------------------------------------------------------------
# 2D rotary position embedding
# ---------------------------------------------------------------------------------------------

def grid_coords(grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """(grid_h*grid_w, 2) float32 (row, col) of each patch, row-major like the token order."""
    rows = torch.arange(grid_h, device=device, dtype=torch.float32)
    cols = torch.arange(grid_w, device=device, dtype=torch.float32)
    return torch.cartesian_prod(rows, cols)


def rope_2d_angles(coords: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(N, 2) positions -> (N, head_dim/2) float32 rotation angle of each pair of head dims.

    Pairs ``[0, head_dim/4)`` rotate with the row, pairs ``[head_dim/4, head_dim/2)`` with the
    column, each axis with the usual 1D RoPE frequencies ``base**(-i / (head_dim/4))``. Positions
    may be fractional or shifted: only differences matter to the attention scores.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    exponents = torch.arange(quarter, device=coords.device, dtype=torch.float32) / quarter
    inv_freq = base ** (-exponents)  # (head_dim/4,)
    coords = coords.float()
    row_angles = coords[:, 0:1] * inv_freq  # (N, head_dim/4)
    col_angles = coords[:, 1:2] * inv_freq  # (N, head_dim/4)
    return torch.cat([row_angles, col_angles], dim=-1)


class RopeTable(NamedTuple):
    """Per-token rotations, built once per trunk forward and shared by every block."""

    rotation: torch.Tensor  # (N, head_dim/2) complex64: e^{j·angle} of each pair of head dims


def rope_table(angles: torch.Tensor | RopeTable) -> RopeTable:
    """(N, head_dim/2) angles -> :class:`RopeTable` (complex64 whatever the compute dtype); a
    table is returned as is."""
    if isinstance(angles, RopeTable):
        return angles
    angles = angles.float()
    return RopeTable(torch.polar(torch.ones_like(angles), angles))


def rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Pairs ``(x[2i], x[2i+1])`` of (..., head_dim) as complex numbers, times ``rotation``
    (complex, broadcastable to (..., head_dim/2)); float32 inside, ``x``'s dtype out.

    One complex multiply: the real-valued form ``x·cos + swap(x)·(-sin, sin)`` took about six
    elementwise passes (mul, flip, copy, mul, add, cast) per tensor, which made RoPE ~8% of the
    B/16 encoder's CPU forward (profile in bench/bench_tokenizer.py's docstring).
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., head_dim/2, 2)
    if pairs.stride(-1) != 1 or pairs.stride(-2) != 2:
        pairs = pairs.contiguous()
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2).to(x.dtype)


def apply_rope(x: torch.Tensor, rope: torch.Tensor | RopeTable) -> torch.Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])`` of (..., N, head_dim) by (N, head_dim/2) angles (or
    their precomputed :class:`RopeTable`).

    A rotation preserves each vector's norm; rotating both q and k makes ``<R_a q, R_b k>`` a
    function of ``b - a`` only. Computed in float32 (large angles lose precision in bf16).
    """
    return rotate_pairs(x, rope_table(rope).rotation)


def patch_rope_angles(config: ViTConfig, num_prefix: int, device=None) -> torch.Tensor | None:
    """(num_prefix + num_patches, head_dim/2) angles for a trunk, or None without RoPE.

    Prefix tokens ([CLS]) get angle 0, i.e. the identity rotation, so attention can rotate every
    token uniformly while leaving [CLS] position-free.
    """
    if not config.rope:
        return None
    g = config.grid_size
    patch_angles = rope_2d_angles(grid_coords(g, g, device), config.head_dim, config.rope_base)
    prefix = patch_angles.new_zeros(num_prefix, patch_angles.shape[1])
    return torch.cat([prefix, patch_angles], dim=0)


def trunk_rope(config: ViTConfig, num_prefix: int, device=None) -> RopeTable | None:
    """The :class:`RopeTable` a trunk's blocks share, or None without RoPE."""
    angles = patch_rope_angles(config, num_prefix, device)
    return None if angles is None else rope_table(angles)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE angles, causal masking and sub-LN."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = True, sub_ln: bool = False,
                 eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.inner_norm = nn.LayerNorm(width, eps=eps) if sub_ln else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope_angles: torch.Tensor | RopeTable | None = None,
                causal: bool = False) -> torch.Tensor:
        """(B, N, width) -> (B, N, width)."""
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))  # (B, N, 3, h, d)
        if rope_angles is not None:
            # q and k rotated in one multiply: (B, N, 2, h, d) by (N, 1, 1, d/2)
            qk = rotate_pairs(qkv[:, :, :2], rope_table(rope_angles).rotation[:, None, None, :])
            q, k = qk.unbind(2)
        else:
            q, k = qkv[:, :, 0], qkv[:, :, 1]
        v = qkv[:, :, 2]
        # (B, N, h, d) -> (B, h, N, d) views; SDPA takes the strides as they are
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal)  # (B, h, N, d)
        out = out.transpose(1, 2).flatten(2)  # (B, N, h*d)
        return self.proj(self.inner_norm(out))


class Mlp(nn.Module):
    """``fc2(gelu(fc1 x))`` with an optional sub-LN on the hidden activations."""

    def __init__(self, width: int, hidden: int, sub_ln: bool = False, eps: float = 1e-6):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.inner_norm = nn.LayerNorm(hidden, eps=eps) if sub_ln else nn.Identity()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.inner_norm(self.act(self.fc1(x))))


class SwiGLU(nn.Module):
    """``w3(silu(w1 x) * w2 x)`` with an optional sub-LN on the gated hidden activations."""

    def __init__(self, width: int, hidden: int, sub_ln: bool = False, eps: float = 1e-6):
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.inner_norm = nn.LayerNorm(hidden, eps=eps) if sub_ln else nn.Identity()
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            hidden = F.silu(self.w1(x)) * self.w2(x)
        else:
            # Without autograd, gate in place: two (tokens, hidden) buffers fewer to allocate
            # and fault in. B/16 at batch 8 on 2 CPU threads: the out-of-place multiply took
            # 7.4 ms per layer, more than the SiLU (5.6 ms).
            hidden = F.silu(self.w1(x), inplace=True).mul_(self.w2(x))
        return self.w3(self.inner_norm(hidden))


class Block(nn.Module):
    """Pre-norm transformer block, shared by the image trunks and the causal text encoder."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, swiglu: bool = False,
                 sub_ln: bool = False, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, qkv_bias=qkv_bias, sub_ln=sub_ln, eps=eps)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        mlp_cls = SwiGLU if swiglu else Mlp
        self.mlp = mlp_cls(width, mlp_hidden, sub_ln=sub_ln, eps=eps)

    def forward(self, x: torch.Tensor, rope_angles: torch.Tensor | RopeTable | None = None,
                causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope_angles, causal)
        return x + self.mlp(self.norm2(x))


def build_blocks(config: ViTConfig) -> nn.ModuleList:
    return nn.ModuleList(
        Block(config.width, config.heads, config.mlp_hidden, swiglu=config.swiglu,
              sub_ln=config.sub_ln, qkv_bias=config.qkv_bias, eps=config.layer_norm_eps)
        for _ in range(config.depth))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear/conv/embedding weights, zero biases, unit LayerNorms (ViT/CLIP)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# Trunks
# ---------------------------------------------------------------------------------------------

def check_pixels(pixels: torch.Tensor, image_size: int) -> None:
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (image_size, image_size):
        raise ValueError(f"expected pixels of shape (B, 3, {image_size}, {image_size}), got "
                         f"{tuple(pixels.shape)}")


class ViTEncoderOutput(NamedTuple):
    cls: torch.Tensor  # (B, width) last-block [CLS] state, before any final LayerNorm
    patches: torch.Tensor  # (B, num_patches, width) last-block patch states, row-major


class ViTEncoder(nn.Module):
    """Pixels -> [CLS] + patch features. Final norms live in the heads that consume them."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        config.validate("ViTEncoder")
        self.config = config
        w = config.width
        self.patch_embed = nn.Conv2d(3, w, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, w))
        self.blocks = build_blocks(config)
        if config.init == "trunc_normal":
            init_weights(self)
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)

    def forward(self, pixels: torch.Tensor) -> ViTEncoderOutput:
        """(B, 3, H, W) in [-1, 1] -> :class:`ViTEncoderOutput`."""
        check_pixels(pixels, self.config.image_size)
        x = self.patch_embed(pixels)  # (B, width, grid, grid)
        x = rearrange(x, "b d h w -> b (h w) d")  # (B, N, width) row-major
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, width)
        rope = trunk_rope(self.config, num_prefix=1, device=x.device)
        for block in self.blocks:
            x = block(x, rope)
        return ViTEncoderOutput(cls=x[:, 0], patches=x[:, 1:])


class ViTDecoder(nn.Module):
    """Token features (B, N, width) -> pixels (B, 3, H, W), unbounded (see :meth:`forward`).

    Head: LayerNorm -> Linear -> Tanh -> Linear to one ``patch**2 * 3`` vector per token, which
    un-patchifies to the image.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        config.validate("ViTDecoder")
        self.config = config
        w, p = config.width, config.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, w))
        self.blocks = build_blocks(config)
        self.head = nn.Sequential(
            nn.LayerNorm(w, eps=config.layer_norm_eps),
            nn.Linear(w, w),
            nn.Tanh(),
            nn.Linear(w, p * p * 3),
        )
        if config.init == "trunc_normal":
            init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, width) -> (B, 3, H, W) raw pixel prediction (the caller bounds it)."""
        n = self.config.num_patches
        if tokens.ndim != 3 or tokens.shape[1:] != (n, self.config.width):
            raise ValueError(f"expected decoder tokens of shape (B, {n}, {self.config.width}), "
                             f"got {tuple(tokens.shape)}")
        x = tokens + self.pos_embed
        rope = trunk_rope(self.config, num_prefix=0, device=x.device)
        for block in self.blocks:
            x = block(x, rope)
        patches = self.head(x)  # (B, N, p*p*3)
        g, p = self.config.grid_size, self.config.patch_size
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=g, w=g, p=p, q=p, c=3)
