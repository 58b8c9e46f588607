"""Conversions between PIL images and model pixel tensors ((B, 3, H, W) float32 in [-1, 1]).

The single definition lives in :mod:`tokenizer.images` (the lowest package that needs it), so an
image read from a file and the same image read from a shard give identical pixels and codes.
"""
from __future__ import annotations

import torch
from PIL import Image

from tokenizer.images import image_to_pixels, pixels_to_uint8

__all__ = ["image_to_pixels", "pixels_to_images"]


def pixels_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images (rounded to uint8)."""
    return [Image.fromarray(pixels_to_uint8(p)) for p in pixels]
