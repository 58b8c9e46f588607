"""Causal text transformer of the QLIP contrastive path (CLIP-style text tower).

Token + learned position embedding, pre-norm causal self-attention blocks (the same
:class:`tokenizer.vit.Block` as the image trunks, GELU MLP), final LayerNorm, then the hidden state
of the end-of-text token is projected to the shared embedding space and L2-normalised.

End-of-text pooling: the EOT token is the last real (non-pad) token of each row. Rows must be
**right-padded** (real tokens first, pads after), which is the CLIP convention. Under causal
attention a token never attends to later positions, so pads after the EOT cannot influence it and
no key-padding mask is needed; the mask (or lengths) only says where each row's EOT sits.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcore.config import ConfigError
from tokenizer.vit import Block, init_weights


@dataclasses.dataclass
class TextConfig:
    """Text tower shape. Defaults are a small CPU tower (the ``tiny`` preset's); the OpenCLIP
    ViT-B tower is vocab 49408, context 77, width 512, depth 12, heads 8."""

    vocab_size: int = 1024
    context_length: int = 64
    width: int = 128
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5

    def validate(self, name: str = "TextConfig") -> None:
        for field in ("vocab_size", "context_length", "width", "depth", "heads"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{name}.{field} must be >= 1, got {getattr(self, field)}")
        if self.width % self.heads:
            raise ConfigError(f"{name}.width ({self.width}) must be divisible by heads "
                              f"({self.heads})")
        if int(self.width * self.mlp_ratio) < 1:
            raise ConfigError(f"{name}.mlp_ratio ({self.mlp_ratio}) gives an empty MLP")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"{name}.layer_norm_eps must be > 0, got {self.layer_norm_eps}")


class TextEncoderOutput(NamedTuple):
    embeds: torch.Tensor  # (B, embed_dim) L2-normalised text embedding
    pooled: torch.Tensor  # (B, width) final-LayerNorm state at the EOT position
    hidden: torch.Tensor  # (B, N, width) final-LayerNorm states of all positions
    eot_index: torch.Tensor  # (B,) int64 position pooled in each row


def eot_positions(attention_mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                  seq_len: int | None = None, batch: int | None = None,
                  device=None) -> torch.Tensor:
    """(B,) int64 index of each row's last real token.

    ``attention_mask`` (B, N) of 0/1 or bool, right-padded; or ``lengths`` (B,) real-token
    counts; or neither, meaning every position is real (EOT = last position).
    """
    if attention_mask is not None and lengths is not None:
        raise ValueError("give attention_mask or lengths, not both")
    if attention_mask is not None:
        mask = attention_mask.to(torch.int64)
        if (mask[:, 1:] > mask[:, :-1]).any():
            raise ValueError("attention_mask must be right-padded (1s then 0s in every row)")
        lengths = mask.sum(-1)
    if lengths is None:
        return torch.full((batch,), seq_len - 1, dtype=torch.int64, device=device)
    lengths = lengths.to(device=device, dtype=torch.int64)
    if (lengths < 1).any() or (lengths > seq_len).any():
        raise ValueError(f"every row needs 1..{seq_len} real tokens, got lengths "
                         f"{lengths.tolist()}")
    return lengths - 1


class TextEncoder(nn.Module):
    """Token ids (B, N) -> L2-normalised text embeddings (B, embed_dim) via EOT pooling."""

    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__()
        config.validate()
        self.config = config
        w = config.width
        self.token_embed = nn.Embedding(config.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.zeros(config.context_length, w))
        self.blocks = nn.ModuleList(
            Block(w, config.heads, int(w * config.mlp_ratio), eps=config.layer_norm_eps)
            for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.proj = nn.Linear(w, embed_dim, bias=False)
        init_weights(self)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, text_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> TextEncoderOutput:
        """(B, N) int ids, N <= context_length, right-padded -> :class:`TextEncoderOutput`."""
        if text_ids.ndim != 2 or text_ids.dtype.is_floating_point:
            raise ValueError(f"text_ids must be (B, N) integers, got {tuple(text_ids.shape)} "
                             f"{text_ids.dtype}")
        batch, seq_len = text_ids.shape
        if not 1 <= seq_len <= self.config.context_length:
            raise ValueError(f"text length {seq_len} must be in [1, context_length="
                             f"{self.config.context_length}]")
        eot = eot_positions(attention_mask, lengths, seq_len, batch, text_ids.device)
        x = self.token_embed(text_ids) + self.pos_embed[:seq_len]  # (B, N, width)
        for block in self.blocks:
            x = block(x, causal=True)
        hidden = self.final_norm(x)
        pooled = hidden[torch.arange(batch, device=x.device), eot]  # (B, width)
        embeds = F.normalize(self.proj(pooled), dim=-1)
        return TextEncoderOutput(embeds, pooled, hidden, eot)
