"""Conversions between PIL images and model pixel tensors ((B, 3, H, W) float32 in [-1, 1])."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_to_pixels(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def pixels_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images (rounded to uint8)."""
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]
