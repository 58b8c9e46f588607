"""Image files <-> pixels <-> QLIP codes: the pure API behind the tokenizer CLI.

Pixels are float32 in [-1, 1], shaped (3, H, W) for one image and (B, 3, H, W) for a batch, with
exactly the conversion of ``unified_mm.data.pixels`` (``x / 127.5 - 1``; back with rounding to
uint8), so codes computed here from a PNG file equal the codes computed from the same image read
out of a shard. (``unified_mm.data.pixels`` re-exports these.)

Codes files (``.json`` or ``.npz``) carry the group indices of a list of images together with the
hash of the tokenizer that produced them, so they are never decoded by a different tokenizer.

Images are never resized: a tokenizer has one input size, and silently resizing would give codes
for a different picture than the one the user pointed at. A wrong size is an error naming the
file and the expected size.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmcore.errors import UserError
from mmcore.io import atomic_output_path, atomic_write_bytes, atomic_write_json
from tokenizer.qlip import QLIP

__all__ = ["load_image", "image_to_pixels", "pixels_to_uint8", "png_bytes", "save_png",
           "grid_size", "encode_images", "decode_to_pixels", "check_group_indices",
           "CODES_FORMAT", "CodesFile", "codes_dtype", "codes_npy_bytes", "codes_header", "write_codes_file",
           "read_codes_file"]


# ---------------------------------------------------------------------------------------------
# Files and pixels
# ---------------------------------------------------------------------------------------------

def image_to_pixels(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode; converted to RGB) -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """Read an image file as (3, H, W) pixels in [-1, 1]; :class:`UserError` naming the file if
    it is missing, not an image, or not ``image_size`` x ``image_size``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with Image.open(path) as img:
            img.load()
            image = img.convert("RGB")
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image (PIL cannot identify its format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: unreadable image: {err}") from None
    if image.size != (image_size, image_size):
        raise UserError(f"{path} is {image.size[0]}x{image.size[1]} but the tokenizer takes "
                        f"{image_size}x{image_size} images (images are not resized; resize it first)")
    return image_to_pixels(image)


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, rounded (what a PNG of these pixels holds)."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected pixels of shape (3, H, W), got {tuple(pixels.shape)}")
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(array.permute(1, 2, 0).cpu().numpy())


def png_bytes(pixels: torch.Tensor) -> bytes:
    """(3, H, W) pixels -> PNG file bytes (deterministic for the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels_to_uint8(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(pixels: torch.Tensor, path: str | Path) -> Path:
    """Write (3, H, W) pixels as a PNG, atomically (a crash never leaves half a file)."""
    return atomic_write_bytes(Path(path), png_bytes(pixels))


# ---------------------------------------------------------------------------------------------
# Codes
# ---------------------------------------------------------------------------------------------

def grid_size(model: QLIP) -> int:
    """Tokens per side of the patch grid (N = grid_size ** 2 tokens per image)."""
    return model.config.encoder.image_size // model.config.encoder.patch_size


def _device(model: QLIP) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model: QLIP, pixels: torch.Tensor, batch_size: int = 64
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) pixels -> (bits (B, N, L) bool, group_indices (B, N, G) int64), on the CPU.

    Batched so that a long list of images does not need all activations at once; the model runs
    in eval mode (its quantizer then uses no collectives).
    """
    size = model.config.encoder.image_size
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
        raise ValueError(f"expected pixels of shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    bits, groups = [], []
    for chunk in pixels.split(batch_size):
        codes = model.encode_codes(chunk.to(_device(model), model.dtype))
        bits.append(codes.bits.cpu())
        groups.append(codes.group_indices.cpu())
    if not groups:  # B = 0
        cfg = model.config.bsq
        n = grid_size(model) ** 2
        return torch.zeros(0, n, cfg.num_bits, dtype=torch.bool), torch.zeros(0, n, cfg.num_groups, dtype=torch.int64)
    return torch.cat(bits), torch.cat(groups)


def check_group_indices(model: QLIP, group_indices: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``group_indices`` is an integer (B, grid*grid, G) tensor with
    every value in [0, 2**group_size). Decoding out-of-range values would silently drop their
    high bits, so they are refused instead."""
    cfg = model.config.bsq
    n, limit = grid_size(model) ** 2, 1 << cfg.group_size
    if group_indices.dtype == torch.bool or group_indices.dtype.is_floating_point \
            or group_indices.dtype.is_complex:
        raise ValueError(f"group indices must be integers, got dtype {group_indices.dtype}")
    if group_indices.ndim != 3 or tuple(group_indices.shape[1:]) != (n, cfg.num_groups):
        raise ValueError(f"group indices must have shape (B, {n}, {cfg.num_groups}) for this "
                         f"tokenizer ({grid_size(model)}x{grid_size(model)} tokens, {cfg.num_groups} "
                         f"groups of {cfg.group_size} bits), got {tuple(group_indices.shape)}")
    if group_indices.numel():
        low, high = int(group_indices.min()), int(group_indices.max())
        if low < 0 or high >= limit:
            bad = low if low < 0 else high
            raise ValueError(f"group index {bad} is out of range: values must be in [0, {limit}) "
                             f"(group_size {cfg.group_size} bits)")


@torch.no_grad()
def decode_to_pixels(model: QLIP, group_indices: torch.Tensor | np.ndarray,
                     batch_size: int = 64) -> torch.Tensor:
    """(B, N, G) group indices -> (B, 3, S, S) pixels in [-1, 1], on the CPU; validated first
    (see :func:`check_group_indices`). Same values as ``model.decode_group_indices``."""
    if isinstance(group_indices, np.ndarray) and group_indices.dtype.kind == "u":
        group_indices = group_indices.astype(np.int64)  # torch has few ops for uint16/32/64
    group_indices = torch.as_tensor(group_indices)
    check_group_indices(model, group_indices)
    model.eval()
    group_indices = group_indices.to(torch.int64)
    outputs = [model.decode_group_indices(chunk.to(_device(model))).cpu()
               for chunk in group_indices.split(batch_size)]
    if not outputs:
        size = model.config.encoder.image_size
        return torch.zeros(0, 3, size, size)
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------------------
# Codes files: what `encode` writes and `decode` reads
# ---------------------------------------------------------------------------------------------

CODES_FORMAT = "qlip-codes/1"


class CodesFile(NamedTuple):
    header: dict  # format, tokenizer_hash, grid_size, num_bits, group_size, num_groups
    sources: list[str]  # the image each row was encoded from
    group_indices: np.ndarray  # (B, N, G) integers; range and shape are checked when decoding


def codes_dtype(group_size: int) -> np.dtype:
    """Smallest unsigned dtype holding [0, 2**group_size); int64 above 32 bits (torch-friendly)."""
    if group_size > 32:
        return np.dtype(np.int64)
    return np.dtype(np.min_scalar_type((1 << group_size) - 1))


def codes_npy_bytes(group_indices: np.ndarray, group_size: int) -> bytes:
    """(N, G) group indices of one image as ``.npy`` file bytes in :func:`codes_dtype` (the
    per-sample ``codes.npy`` of precomputed shards; read back with ``np.load``)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(group_indices).astype(codes_dtype(group_size)), allow_pickle=False)
    return buffer.getvalue()


def codes_header(model: QLIP, tokenizer_hash: str) -> dict:
    """What a reader needs to check before decoding: above all the hash of the tokenizer."""
    cfg = model.config.bsq
    return {"format": CODES_FORMAT, "tokenizer_hash": tokenizer_hash, "grid_size": grid_size(model),
            "num_bits": cfg.num_bits, "group_size": cfg.group_size, "num_groups": cfg.num_groups}


def write_codes_file(path: str | Path, header: dict, sources: Sequence[str],
                     group_indices: torch.Tensor, bits: torch.Tensor | None = None) -> Path:
    """Write ``.json`` (readable: indices as lists, bits as one '0101..' string per token) or
    ``.npz`` (compact: ``header`` JSON string, ``sources``, ``group_indices`` in
    :func:`codes_dtype`, optional bool ``bits``), atomically."""
    path = Path(path)
    if path.suffix not in (".json", ".npz"):
        raise ValueError(f"codes file must end in .json or .npz, got {path}")
    if path.suffix == ".json":
        images = []
        for i, source in enumerate(sources):
            entry = {"source": str(source), "group_indices": group_indices[i].tolist()}
            if bits is not None:
                entry["bits"] = ["".join("01"[b] for b in token) for token in bits[i].tolist()]
            images.append(entry)
        return atomic_write_json(path, {**header, "images": images})
    arrays = {"header": np.array(json.dumps(header)), "sources": np.array([str(s) for s in sources]),
              "group_indices": group_indices.numpy().astype(codes_dtype(header["group_size"]))}
    if bits is not None:
        arrays["bits"] = bits.numpy()
    with atomic_output_path(path) as tmp, open(tmp, "wb") as stream:
        np.savez_compressed(stream, **arrays)
    return path


def _parse_codes(path: Path) -> tuple[object, list[str], np.ndarray]:
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        images = data.pop("images")
        return data, [str(e["source"]) for e in images], np.array([e["group_indices"] for e in images])
    with np.load(path, allow_pickle=False) as npz:
        sources = [str(s) for s in npz["sources"]]
        return json.loads(str(npz["header"])), sources, npz["group_indices"]


def read_codes_file(path: str | Path) -> CodesFile:
    """Read a codes file; a missing, corrupt or foreign file is a :class:`UserError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"codes file not found: {path}")
    try:
        header, sources, groups = _parse_codes(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, RecursionError,
            zipfile.BadZipFile) as err:
        raise UserError(f"{path}: corrupt or unreadable codes file ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict) or header.get("format") != CODES_FORMAT \
            or not isinstance(header.get("tokenizer_hash"), str):
        raise UserError(f"{path}: not a codes file written by encode (format {CODES_FORMAT!r} "
                        "with a tokenizer_hash)")
    if groups.dtype.kind not in "iu" or len(sources) != len(groups) or not len(groups):
        raise UserError(f"{path}: corrupt codes file: needs integer group indices for >= 1 image, "
                        f"got dtype {groups.dtype}, shape {groups.shape}, {len(sources)} sources")
    return CodesFile(header, sources, groups)
