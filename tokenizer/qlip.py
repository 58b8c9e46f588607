"""QLIP: a BSQ autoencoder whose ViT encoder is also CLIP-aligned with text (NVlabs 2025).

Data flow for pixels (B, 3, H, W) in [-1, 1]::

    ViTEncoder ─┬─ [CLS] ─ LayerNorm ─ Linear ─ L2 ─────────────────────> image_embeds (B, E)
                └─ patches (B, N, d_enc), no final LayerNorm
                     ─ MLP↓ (d_enc -> h -> L) ─ L2 ─ BSQ ─> codes (bits, group indices, û)
                     ─ MLP↑ (L -> h -> d_dec) ─ ViTDecoder ─> reconstruction (B, 3, H, W)
    text ids ─ TextEncoder (causal, EOT pooling) ─ Linear ─ L2 ────────> text_embeds (B, E)

The patch path skips the final LayerNorm (per the design): that LayerNorm belongs to the
contrastive head, and the quantizer path gets its own projection and normalisation instead. The
bottleneck MLPs are cheap (~1 % of the model) and give the quantizer room to pick which L of the
d_enc directions to keep. Training (elsewhere) uses: a contrastive loss on (image_embeds,
text_embeds) scaled by ``logit_scale``, a reconstruction loss on ``reconstruction`` and
``bsq.loss``; stage 2 calls :meth:`QLIP.freeze_encoder` and :meth:`QLIP.drop_text` and trains
only the bottleneck MLPs and the decoder.

Parameter counts (``count_parameters``; ``python -m tokenizer.qlip`` prints them)::

    preset         encoder   bottleneck      decoder         text        total
    tiny           824,448       36,492      824,240      750,720    2,435,901
    B-16-256    86,317,824    1,226,524   86,513,664   63,428,096  237,486,109
    B-8-256     86,465,280    1,226,524   86,660,544   63,428,096  237,780,445
    L-14-392   304,669,632    2,159,644  304,930,316  123,650,304  735,409,897
    (totals include the one-parameter logit_scale)

The paper quotes 87M / 87M / 1M (B) and 304M / 304M / 2M (L) for encoder / decoder /
bottleneck; our encoder and decoder are within 1 % (B: 86.3M / 86.5M, L: 304.7M / 304.9M).
For B-16-256 the encoder is: patch embedding 0.59M + [CLS] and 197 positions 0.20M + 12 EVA-02
blocks 85.13M (7.09M each; SwiGLU with hidden int(768 * 8/3) = 2048 is as big as a GELU MLP of
ratio 4) + [CLS] LayerNorm and image projection 0.39M. The decoder is: 256 positions 0.20M + the
same 12 blocks + head 1.18M (LayerNorm, 768x768, 768x768). The 0.5-0.7M left to "87M" is
within the paper's rounding plus details we do not replicate (bias choices, exact head shapes
of the release). B-8-256 has a smaller patch embedding / head (patch 8) but 4x the positions. The
bottleneck is LayerNorm + MLP↓ (768x768 + 768x28) + MLP↑ (28x768 + 768x768) = 1.23M ("1M");
L: 2.16M ("2M"). The tiny preset uses plain pre-LN blocks (GELU MLP, ratio 4) with RoPE: with
EVA-02 blocks it collapsed to a single code within 20 steps on ShapesWorld (see PRESET_ROWS).
The text towers are the OpenCLIP B (63.4M) and L (123.7M) shapes.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcore.config import ConfigError, config_from_dict, config_to_dict, deep_merge
from tokenizer.bsq import BSQConfig, BSQOutput, BSQuantizer, bits_to_quantized
from tokenizer.text_encoder import TextConfig, TextEncoder
from tokenizer.vit import ViTConfig, ViTDecoder, ViTEncoder, ViTEncoderOutput

__all__ = [
    "ViTConfig", "TextConfig", "QLIPConfig", "PresetRow", "PRESET_ROWS", "PRESETS",
    "preset_config", "QLIP", "EncodeOutput", "QLIPOutput", "build_qlip", "count_parameters",
    "PARTS",
]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

ImagePool = Literal["cls", "mean", "attention"]  # QLIPConfig.image_pool
IMAGE_POOLS = get_args(ImagePool)
CodePool = Literal["mean", "attention"]  # QLIPConfig.code_pool
CODE_POOLS = get_args(CodePool)


@dataclasses.dataclass
class QLIPConfig:
    """Whole tokenizer. Defaults are a small plain-ViT CPU model (the ``tiny`` shape without the
    EVA-02 options); :data:`PRESETS` / :func:`preset_config` hold the real ones."""

    encoder: ViTConfig = dataclasses.field(default_factory=ViTConfig)
    decoder: ViTConfig = dataclasses.field(default_factory=ViTConfig)
    text: TextConfig | None = dataclasses.field(default_factory=TextConfig)  # None: no text tower
    embed_dim: int = 128  # shared image/text embedding size of the contrastive path
    bsq: BSQConfig = dataclasses.field(default_factory=BSQConfig)
    bottleneck_hidden: int | None = None  # hidden width of MLP↓ / MLP↑; None = encoder width
    bottleneck_act: Literal["gelu", "tanh"] = "gelu"
    init_temperature: float = 0.07  # logit_scale starts at ln(1 / init_temperature)
    max_logit_scale: float = 100.0  # logit_scale is clamped to ln(max_logit_scale) when used
    # What the contrastive image embedding reads (ImageEmbeddingHead): "cls" (QLIP / EVA-CLIP: the
    # last block's [CLS] state), "mean" (mean of the last patch states) or "attention" (one more
    # attention step of a learned query over the last states, SigLIP's MAP pooling without its MLP).
    image_pool: ImagePool = "cls"
    # A linear head from the mean of the quantized codes to the contrastive space (code_embeds),
    # for a second CLIP term on the codes themselves (train: weights.code_align). The [CLS] path
    # aligns the encoder, not the codes a language model reads: on the demo's codes an object's
    # centre patch names its colour but its shape only 60% of the time, so shape must be pieced
    # together from several patches. Aligning the codes' mean asks the patches to carry what the
    # caption says. Measured (session 18): shape readable from the mean bits 47% -> 99.7%, better
    # VQA on one-object images, worse on several at patch 4 (configs/tokenizer/tiny_stage1.yaml); on
    # in the demo, whose patches are whole grid cells (configs/tokenizer/tiny_stage1_cell.yaml).
    code_head: bool = False
    # How the code head pools an image's codes: "mean" (every patch counts alike, so the encoder
    # gains by writing the caption into every patch, background included: a background patch's
    # code then names the object's shape 67% of the time against 22%) or "attention" (a softmax
    # over patches of a score linear in each code, so a few patches can carry it).
    code_pool: CodePool = "mean"

    @property
    def bottleneck_width(self) -> int:
        return self.bottleneck_hidden or self.encoder.width

    def validate(self) -> None:
        self.encoder.validate("QLIPConfig.encoder")
        self.decoder.validate("QLIPConfig.decoder")
        if self.text is not None:
            self.text.validate("QLIPConfig.text")
        self.bsq.validate()
        enc, dec = self.encoder, self.decoder
        if (enc.image_size, enc.patch_size) != (dec.image_size, dec.patch_size):
            raise ConfigError(f"QLIPConfig: decoder image_size/patch_size ({dec.image_size}/"
                              f"{dec.patch_size}) must equal the encoder's ({enc.image_size}/"
                              f"{enc.patch_size}): the decoder rebuilds the encoder's token grid")
        if self.embed_dim < 1:
            raise ConfigError(f"QLIPConfig.embed_dim must be >= 1, got {self.embed_dim}")
        if self.bottleneck_hidden is not None and self.bottleneck_hidden < 1:
            raise ConfigError(f"QLIPConfig.bottleneck_hidden must be >= 1 or null, got "
                              f"{self.bottleneck_hidden}")
        if self.bottleneck_act not in ("gelu", "tanh"):
            raise ConfigError(f"QLIPConfig.bottleneck_act must be 'gelu' or 'tanh', got "
                              f"{self.bottleneck_act!r}")
        if self.image_pool not in IMAGE_POOLS:
            raise ConfigError(f"QLIPConfig.image_pool must be one of {', '.join(IMAGE_POOLS)}, got "
                              f"{self.image_pool!r}")
        if self.code_pool not in CODE_POOLS:
            raise ConfigError(f"QLIPConfig.code_pool must be one of {', '.join(CODE_POOLS)}, got "
                              f"{self.code_pool!r}")
        if not self.init_temperature > 0:
            raise ConfigError(f"QLIPConfig.init_temperature must be > 0, got "
                              f"{self.init_temperature}")
        if not self.max_logit_scale >= 1:
            raise ConfigError(f"QLIPConfig.max_logit_scale must be >= 1, got "
                              f"{self.max_logit_scale}")


# ---------------------------------------------------------------------------------------------
# Presets: one row per model
# ---------------------------------------------------------------------------------------------

class PresetRow(NamedTuple):
    """Shape of one preset. Encoder and decoder share it (symmetric, as in the paper)."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    embed_dim: int
    text: tuple[int, int, int] | None  # (width, depth, heads) of the text tower
    vocab_size: int
    context_length: int
    num_bits: int
    group_size: int
    entropy_mode: str
    eva_blocks: bool  # EVA-02 block (RoPE + SwiGLU + sub-LN) or plain pre-LN block (+ RoPE)
    init: str  # "trunc_normal" (std 0.02, ViT/CLIP) or "fan_in" (PyTorch default; small widths)
    inv_temperature: float  # BSQ τ; ~L keeps per-bit logits 4τ·u_i/√L = O(4) for |u_i| ~ 1/√L


PRESET_ROWS: dict[str, PresetRow] = {
    # CPU model: 8x8 tokens, 12 bits = 2 AR tokens of 64 codes per patch; trains in minutes.
    # vocab 1024 covers the project's 512-piece sentencepiece + specials.
    # Plain blocks: with EVA blocks this model collapsed to a single code within 20 steps on
    # ShapesWorld (every patch token converged to one vector); plain pre-LN blocks train.
    "tiny":     PresetRow(32, 4, 128, 4, 4, 128, (128, 3, 4), 1024, 64, 12, 6, "group", False, "fan_in", 10.0),
    # Released-model shapes: EVA-02 ViT-B / ViT-L trunks, OpenCLIP B / L text towers, 28 bits.
    # group_size 14 (2 AR tokens of 16384 codes); 'analytical' entropy because 'group' mode
    # would materialise 2**14 probabilities per token and group.
    "B-16-256": PresetRow(256, 16, 768, 12, 12, 512, (512, 12, 8), 49408, 77, 28, 14, "analytical",
                          True, "trunc_normal", 28.0),
    "B-8-256":  PresetRow(256, 8, 768, 12, 12, 512, (512, 12, 8), 49408, 77, 28, 14, "analytical",
                          True, "trunc_normal", 28.0),
    "L-14-392": PresetRow(392, 14, 1024, 24, 16, 768, (768, 12, 12), 49408, 77, 28, 14,
                          "analytical", True, "trunc_normal", 28.0),
}

# BSQ loss weights of every preset (τ is per row). Measured on the tiny preset: τ = 1 leaves the
# soft assignments near uniform, so the entropy term cannot stop code collapse; τ = 10 with
# entropy weight 1 and no commitment kept 9 of 12 bits in use after 80 steps.
_BSQ_LOSS = dict(gamma=1.0, entropy_weight=1.0, commit_weight=0.0)


def _config_from_row(row: PresetRow) -> QLIPConfig:
    """All presets use the EVA-02 block (2D RoPE, SwiGLU with hidden int(8/3 d), sub-LN)."""
    trunk = ViTConfig(image_size=row.image_size, patch_size=row.patch_size, width=row.width,
                      depth=row.depth, heads=row.heads, mlp_ratio=8 / 3 if row.eva_blocks else 4.0,
                      swiglu=row.eva_blocks, sub_ln=row.eva_blocks, rope=True, init=row.init)
    text = None
    if row.text is not None:
        t_width, t_depth, t_heads = row.text
        text = TextConfig(vocab_size=row.vocab_size, context_length=row.context_length,
                          width=t_width, depth=t_depth, heads=t_heads)
    bsq = BSQConfig(num_bits=row.num_bits, group_size=row.group_size, entropy_mode=row.entropy_mode,
                    inv_temperature=row.inv_temperature, **_BSQ_LOSS)
    config = QLIPConfig(encoder=trunk, decoder=copy.deepcopy(trunk), text=text,
                        embed_dim=row.embed_dim, bsq=bsq)
    config.validate()
    return config


PRESETS: dict[str, QLIPConfig] = {name: _config_from_row(row) for name, row in PRESET_ROWS.items()}


def preset_config(name: str, overrides: dict | None = None) -> QLIPConfig:
    """A fresh copy of preset ``name``, optionally deep-merged with a dict of overrides
    (e.g. ``{"bsq": {"entropy_weight": 0.05}, "text": None}``), validated."""
    if name not in PRESETS:
        raise ConfigError(f"unknown QLIP preset {name!r}; known: {', '.join(PRESETS)}")
    if not overrides:
        return copy.deepcopy(PRESETS[name])
    return config_from_dict(QLIPConfig, deep_merge(config_to_dict(PRESETS[name]), overrides))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

class EncodeOutput(NamedTuple):
    image_embeds: torch.Tensor  # (B, E) L2-normalised contrastive image embedding
    codes: BSQOutput  # per patch: quantized (B, N, L), bits (B, N, L), group_indices (B, N, G)
    latents: torch.Tensor  # (B, N, L) L2-normalised pre-quantization vectors u


class QLIPOutput(NamedTuple):
    image_embeds: torch.Tensor  # (B, E) L2-normalised
    text_embeds: torch.Tensor | None  # (B_text, E) L2-normalised; None without text input
    reconstruction: torch.Tensor  # (B_dec, 3, H, W) in [-1, 1] (straight-through clamp); the first
    #   B_dec <= B images (forward's decode_count)
    bsq: BSQOutput  # codes and the quantizer's loss / metrics
    logit_scale: torch.Tensor  # () exp of the clamped learnable log-scale
    code_embeds: torch.Tensor | None = None  # (B, E) L2-normalised; with config.code_head only


class ImageEmbeddingHead(nn.Module):
    """Encoder states -> pooled (B, width) -> LayerNorm -> Linear -> L2: the image side of the
    contrastive path. ``pool`` (:attr:`QLIPConfig.image_pool`) picks what is pooled."""

    def __init__(self, width: int, embed_dim: int, eps: float, pool: str = "cls", heads: int = 1):
        super().__init__()
        self.pool = pool
        if pool == "attention":
            self.probe = nn.Parameter(torch.zeros(1, 1, width))
            nn.init.trunc_normal_(self.probe, std=0.02, a=-0.04, b=0.04)
            self.pool_norm = nn.LayerNorm(width, eps=eps)
            self.pool_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)

    def pooled(self, features: ViTEncoderOutput) -> torch.Tensor:
        """(B, width): the [CLS] state, the patch mean, or the probe's attention read-out."""
        if self.pool == "cls":
            return features.cls
        if self.pool == "mean":
            return features.patches.mean(dim=1)
        tokens = self.pool_norm(torch.cat([features.cls[:, None], features.patches], dim=1))  # (B, 1 + N, width)
        probe = self.probe.expand(tokens.shape[0], -1, -1)  # (B, 1, width)
        return self.pool_attn(probe, tokens, tokens, need_weights=False)[0][:, 0]

    def forward(self, features: ViTEncoderOutput) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(self.pooled(features))), dim=-1)


class CodeEmbeddingHead(nn.Module):
    """(B, N, L) code vectors -> pooled (B, L) -> Linear -> L2: the codes' own contrastive
    embedding. ``pool``: "mean", or "attention" (softmax over patches of a score linear in each
    code). Either way the embedding sees nothing but the codes, so only what they carry aligns."""

    def __init__(self, num_bits: int, embed_dim: int, pool: str = "mean"):
        super().__init__()
        self.score = nn.Linear(num_bits, 1) if pool == "attention" else None
        self.proj = nn.Linear(num_bits, embed_dim)

    def pooled(self, quantized: torch.Tensor) -> torch.Tensor:
        if self.score is None:
            return quantized.mean(dim=1)
        weights = self.score(quantized).softmax(dim=1)  # (B, N, 1)
        return (weights * quantized).sum(dim=1)  # (B, L)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.pooled(quantized)), dim=-1)


def _mlp(d_in: int, hidden: int, d_out: int, act: str) -> nn.Sequential:
    # PyTorch's default (fan-in scaled) init, not the trunk's std=0.02: at 0.02 two layers shrink
    # the signal ~20x, the shared component of the patch tokens dominates every unit vector and
    # all tokens start (and stay) on one code.
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU() if act == "gelu" else nn.Tanh(),
                         nn.Linear(hidden, d_out))


class Bottleneck(nn.Module):
    """MLP↓ to L dims + L2 normalisation (quantizer input) and MLP↑ back to decoder width."""

    def __init__(self, config: QLIPConfig):
        super().__init__()
        L = config.bsq.num_bits
        hidden, act = config.bottleneck_width, config.bottleneck_act
        # LayerNorm first: the raw residual stream (no final encoder norm on this path) carries a
        # large component shared by all tokens; normalising per token lets their differences
        # decide the code.
        self.down = nn.Sequential(nn.LayerNorm(config.encoder.width), _mlp(config.encoder.width, hidden, L, act))
        self.up = _mlp(L, hidden, config.decoder.width, act)

    def to_unit(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, d_enc) -> (B, N, L) unit vectors."""
        return F.normalize(self.down(patches), dim=-1)

    def from_codes(self, quantized: torch.Tensor) -> torch.Tensor:
        """(B, N, L) code vectors -> (B, N, d_dec) decoder input."""
        return self.up(quantized)


def clamp_pixels(raw: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] with an identity gradient.

    The forward value is exactly in range (``clamped + (raw - raw) == clamped``), while a pixel
    that overshoots still gets a gradient pulling it back, unlike ``torch.clamp`` whose zero
    gradient outside the range can leave saturated pixels stuck.
    """
    return raw.clamp(-1.0, 1.0) + (raw - raw.detach())


class QLIP(nn.Module):
    """The tokenizer. See the module docstring for the data flow."""

    def __init__(self, config: QLIPConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = ViTEncoder(config.encoder)
        self.image_head = ImageEmbeddingHead(config.encoder.width, config.embed_dim,
                                             config.encoder.layer_norm_eps, config.image_pool,
                                             config.encoder.heads)
        self.bottleneck = Bottleneck(config)
        self.quantizer = BSQuantizer(config.bsq)
        self.code_head = CodeEmbeddingHead(config.bsq.num_bits, config.embed_dim, config.code_pool) \
            if config.code_head else None
        self.decoder = ViTDecoder(config.decoder)
        self.text = TextEncoder(config.text, config.embed_dim) if config.text is not None else None
        # shape (1,), not (): DeepSpeed's parameter broadcast cannot handle 0-dim tensors
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / config.init_temperature)]))
        self._encoder_frozen = False

    # -- stage-2 switches -----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the decoder side (code vectors are built in it)."""
        return self.decoder.pos_embed.dtype

    @property
    def encoder_frozen(self) -> bool:
        return self._encoder_frozen

    def freeze_encoder(self, codes_too: bool = False) -> "QLIP":
        """Stop training everything but the bottleneck MLPs and the decoder.

        Freezes the ViT encoder, the [CLS] head, the text tower (if any) and the logit scale, and
        runs the encoder trunk without autograd from then on (no activations kept for it).
        ``codes_too`` also freezes the bottleneck's down MLP, so images keep the codes they had
        (only the up MLP and the decoder train).
        """
        for module in (self.encoder, self.image_head, self.code_head, self.text,
                       self.bottleneck.down if codes_too else None):
            if module is not None:
                module.requires_grad_(False)
        self.logit_scale.requires_grad_(False)
        self._encoder_frozen = True
        return self

    def drop_text(self) -> "QLIP":
        """Delete the text tower (stage 2 / tokenization only); ``config.text`` becomes None."""
        self.text = None
        self.config = dataclasses.replace(self.config, text=None)
        return self

    # -- image paths --------------------------------------------------------------------------
    def _trunk(self, pixels: torch.Tensor):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._encoder_frozen):
            return self.encoder(pixels)

    def encode(self, pixels: torch.Tensor) -> EncodeOutput:
        """(B, 3, H, W) in [-1, 1] -> image embedding, BSQ codes and pre-quantization latents."""
        features = self._trunk(pixels)
        latents = self.bottleneck.to_unit(features.patches)  # (B, N, L)
        return EncodeOutput(self.image_head(features), self.quantizer(latents), latents)

    def encode_image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E) L2-normalised image embeddings (skips the quantizer)."""
        return self.image_head(self._trunk(pixels))

    def encode_codes(self, pixels: torch.Tensor) -> BSQOutput:
        """(B, 3, H, W) -> BSQOutput with bits (B, N, L) and group_indices (B, N, G), row-major."""
        latents = self.bottleneck.to_unit(self._trunk(pixels).patches)
        return self.quantizer(latents)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, N, L) bool bits or float code vectors (±1/sqrt(L)) -> (B, 3, H, W) in [-1, 1]."""
        if codes.dtype == torch.bool:
            codes = bits_to_quantized(codes, self.dtype)
        elif not codes.dtype.is_floating_point:
            raise TypeError(f"decode_codes takes bool bits or float code vectors, got "
                            f"{codes.dtype}; use decode_group_indices for integer indices")
        if codes.shape[-1] != self.config.bsq.num_bits:
            raise ValueError(f"expected codes with last dim num_bits={self.config.bsq.num_bits}, "
                             f"got {tuple(codes.shape)}")
        return clamp_pixels(self.decoder(self.bottleneck.from_codes(codes)))

    def decode_group_indices(self, group_indices: torch.Tensor) -> torch.Tensor:
        """(B, N, G) int group indices (e.g. sampled by the AR model) -> (B, 3, H, W)."""
        return self.decode_codes(self.quantizer.decode_group_indices(group_indices, self.dtype))

    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, H, W) through the quantizer, in [-1, 1]."""
        return self.decode_codes(self.encode_codes(pixels).quantized)

    # -- text / contrastive -------------------------------------------------------------------
    def encode_text(self, text_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) right-padded ids -> (B, E) L2-normalised text embeddings (EOT pooling).

        Each distinct row (ids and mask) goes through the tower once and its embedding is
        repeated: the tower has no batch-dependent layers, so the outputs and, through the
        indexing's backward, the gradients are those of encoding every row. A stage-1 batch of
        ShapesWorld repeats a third of its 5 captions per image (short captions and their hard
        negatives come from 24 colour x shape pairs).
        """
        if self.text is None:
            raise RuntimeError("this QLIP has no text tower (config.text is None or dropped)")
        if lengths is None and text_ids.ndim == 2 and text_ids.shape[0] > 1 and (
                attention_mask is None or attention_mask.shape == text_ids.shape):
            keys = text_ids if attention_mask is None else torch.cat(
                [text_ids, attention_mask.to(text_ids.dtype)], dim=1)  # (B, N or 2N)
            unique_keys, inverse = torch.unique(keys, dim=0, return_inverse=True)
            if unique_keys.shape[0] < keys.shape[0]:
                n = text_ids.shape[1]
                unique_mask = None if attention_mask is None else unique_keys[:, n:].to(attention_mask.dtype)
                return self.text(unique_keys[:, :n], unique_mask).embeds[inverse]  # (B, E)
        return self.text(text_ids, attention_mask, lengths).embeds

    def get_logit_scale(self) -> torch.Tensor:
        """() exp(min(log-scale, ln(max_logit_scale))): multiply cosine similarities by it."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp().squeeze(0)

    def forward(self, pixels: torch.Tensor, text_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decode_count: int | None = None) -> QLIPOutput:
        """Everything a training step needs; text embeddings only when ``text_ids`` is given.
        ``decode_count``: decode only the first that many images (None: all), for a training step
        that scores reconstruction on part of the batch (``TokenizerTrainConfig.recon_fraction``)."""
        encoded = self.encode(pixels)
        quantized = encoded.codes.quantized if decode_count is None else encoded.codes.quantized[:decode_count]
        reconstruction = self.decode_codes(quantized)  # (decode_count or B, 3, H, W)
        text_embeds = None
        if text_ids is not None:
            text_embeds = self.encode_text(text_ids, attention_mask)
        return QLIPOutput(encoded.image_embeds, text_embeds, reconstruction, encoded.codes,
                          self.get_logit_scale(), self.code_embeds(encoded.codes.quantized))

    def code_embeds(self, quantized: torch.Tensor) -> torch.Tensor | None:
        """(B, N, L) code vectors -> (B, E) L2-normalised embedding of their pool (None without
        ``config.code_head``; :class:`CodeEmbeddingHead`)."""
        return None if self.code_head is None else self.code_head(quantized)


# ---------------------------------------------------------------------------------------------
# Building and counting
# ---------------------------------------------------------------------------------------------

def build_qlip(config_or_preset: QLIPConfig | str) -> QLIP:
    """A QLIP from a config or a preset name. Wrap in ``with torch.device("meta"):`` to get the
    structure without allocating weights (e.g. to count parameters of the big presets)."""
    config = preset_config(config_or_preset) if isinstance(config_or_preset, str) \
        else config_or_preset
    return QLIP(config)


# part name -> parameter-name prefixes; every parameter belongs to exactly one part
PARTS: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder.", "image_head.", "code_head."),
    "bottleneck": ("bottleneck.",),
    "decoder": ("decoder.",),
    "text": ("text.",),
    "logit_scale": ("logit_scale",),
}


def count_parameters(model: QLIP, trainable_only: bool = False) -> dict[str, int]:
    """Parameter count per part (see :data:`PARTS`) plus ``total``; works on meta tensors."""
    counts = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        part = next((p for p, prefixes in PARTS.items() if name.startswith(prefixes)), None)
        if part is None:
            raise RuntimeError(f"parameter {name!r} belongs to no part in PARTS")
        counts[part] += param.numel()
    counts["total"] = sum(counts.values())
    return counts


def _print_counts() -> None:
    parts = [*PARTS, "total"]
    print(f"{'preset':10}" + "".join(f"{p:>14}" for p in parts))
    for name in PRESETS:
        with torch.device("meta"):
            counts = count_parameters(build_qlip(name))
        print(f"{name:10}" + "".join(f"{counts[p]:>14,}" for p in parts))


if __name__ == "__main__":
    _print_counts()
