"""Image metrics: PSNR, SSIM, and FID from a feature network the user supplies by path.

* PSNR: ``10 log10(MAX^2 / MSE)`` with MAX = 255 for uint8 images and 1 for float images in
  [0, 1]; identical images give ``inf``.
* SSIM (Wang, Bovik, Sheikh & Simoncelli 2004, the reference ``ssim_index.m``): an 11 x 11
  Gaussian window with sigma 1.5, ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` for the data range L,
  local statistics over the window positions fully inside the image ('valid' filtering), the SSIM
  map averaged per channel and the channel means averaged.
* FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to two feature sets,
  ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``. scipy's ``sqrtm`` is not
  available, and it is not needed: ``tr((S_a S_b)^(1/2)) = tr((A S_b A)^(1/2))`` with
  ``A = S_a^(1/2)``, and ``A S_b A`` is symmetric positive semi-definite, so both square roots come
  from symmetric eigendecompositions (eigenvalues clipped at 0 against round-off), in float64.

Feature networks (:func:`load_feature_network`) come in two formats:

* **safetensors + JSON** (the safe default, no code is run): a directory holding
  ``config.json`` and ``model.safetensors`` for :class:`ConvFeatureNet`. ``config.json``:
  ``{"format": "conv-feature-net", "in_channels": 3, "channels": [16, 32], "kernel_size": 3,
  "input_size": 32, "input_scale": 1.0}``; the state dict must match the architecture exactly.
* **TorchScript** (a ``.pt``, ``.pth``, ``.torchscript``, ``.ts`` or ``.jit`` file, e.g. the
  Inception-v3 export several FID tools use): loaded with ``torch.jit.load``, which does not go
  through Python's ``pickle``: it reads a TorchScript archive whose data records are decoded by
  TorchScript's own restricted unpickler (tensors and a fixed set of types, no arbitrary Python
  callables); a plain ``torch.save`` checkpoint is refused. The archive's TorchScript program *is*
  executed at forward time, so load only files you trust as code.
  (PyTorch 2.13 marks TorchScript deprecated; loading still works, and the warning is silenced.)

Every network receives float images ``[N, 3, H, W]`` with values in ``[0, input_scale]`` (1.0, or
255.0 for networks trained on byte-range pixels), resized bilinearly to ``input_size`` when set,
and must return features ``[N, D]`` (``[N, D, 1, 1]`` is flattened).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mmcore.errors import UserError

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".torchscript", ".ts", ".jit")
FEATURE_NET_FORMAT = "conv-feature-net"


# ---------------------------------------------------------------------------------------------
# PSNR and SSIM
# ---------------------------------------------------------------------------------------------

def _as_float_pixels(image: np.ndarray, name: str) -> tuple[np.ndarray, float]:
    """float64 pixels and their data range: uint8 -> 255, float -> 1 (values must be in [0, 1])."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float64), 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{name}: expected uint8 or float pixels, got dtype {image.dtype}")
    if image.size and (image.min() < 0 or image.max() > 1):
        raise ValueError(f"{name}: float pixels must lie in [0, 1], got [{image.min()}, {image.max()}]")
    return image.astype(np.float64), 1.0


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    if np.asarray(a).dtype != np.asarray(b).dtype:
        raise ValueError(f"images differ in dtype: {np.asarray(a).dtype} vs {np.asarray(b).dtype}")
    x, data_range = _as_float_pixels(a, "first image")
    y, _ = _as_float_pixels(b, "second image")
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    return x, y, data_range


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two same-shape images (any layout), uint8 or float in [0, 1]."""
    x, y, data_range = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps (the 2-D window is their outer product)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return taps / taps.sum()


def _filter_valid(plane: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D plane with ``taps`` along both axes."""
    size = len(taps)
    rows = sum(w * plane[i:plane.shape[0] - size + 1 + i, :] for i, w in enumerate(taps))
    return sum(w * rows[:, i:rows.shape[1] - size + 1 + i] for i, w in enumerate(taps))


def ssim_map(x: np.ndarray, y: np.ndarray, data_range: float, taps: np.ndarray | None = None) -> np.ndarray:
    """SSIM index at every valid window position of two 2-D float planes (Wang et al. eq. 13)."""
    taps = gaussian_window() if taps is None else taps
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, taps), _filter_valid(y, taps)
    var_x = _filter_valid(x * x, taps) - mu_x ** 2
    var_y = _filter_valid(y * y, taps) - mu_y ** 2
    cov = _filter_valid(x * y, taps) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two images, ``[H, W]`` or ``[H, W, C]`` (channels last), uint8 or float in
    [0, 1], each side >= 11 px: the SSIM map's mean per channel, averaged over channels."""
    x, y, data_range = _pair(a, b)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    if x.ndim != 3 or min(x.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs [H, W] or [H, W, C] images with H, W >= {SSIM_WINDOW}, got {x.shape}")
    taps = gaussian_window()
    return float(np.mean([ssim_map(x[..., c], y[..., c], data_range, taps).mean()
                          for c in range(x.shape[2])]))


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------

def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via ``eigh``."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """``tr((S_a S_b)^(1/2))`` computed as ``sum(sqrt(eig(A S_b A)))`` with ``A = S_a^(1/2)``."""
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet distance of N(mu_a, cov_a) and N(mu_b, cov_b) (Dowson & Landau 1982)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt_product(cov_a, cov_b)
    return max(float(value), 0.0)  # tiny negative values are round-off


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (as ``np.cov``) of features ``[N, D]``."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N, D] with N >= 2, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or inf")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets ``[N_a, D]`` and ``[N_b, D]`` (module docstring)."""
    mu_a, cov_a = feature_statistics(feats_a)
    mu_b, cov_b = feature_statistics(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance(mu_a, cov_a, mu_b, cov_b)


# ---------------------------------------------------------------------------------------------
# Feature networks
# ---------------------------------------------------------------------------------------------

@dataclass
class ConvNetConfig:
    """``config.json`` of a :class:`ConvFeatureNet` (see the module docstring)."""
    channels: list[int]
    in_channels: int = 3
    kernel_size: int = 3
    input_size: int | None = None
    input_scale: float = 1.0
    format: str = FEATURE_NET_FORMAT


def _conv_net_class():
    import torch
    from torch import nn

    class ConvFeatureNet(nn.Module):
        """Stride-2 conv + ReLU blocks, then global average pooling: features ``[N, channels[-1]]``."""

        def __init__(self, cfg: ConvNetConfig):
            super().__init__()
            widths = [cfg.in_channels, *cfg.channels]
            self.blocks = nn.ModuleList(
                nn.Conv2d(a, b, cfg.kernel_size, stride=2, padding=cfg.kernel_size // 2)
                for a, b in zip(widths, widths[1:]))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                images = torch.relu(block(images))
            return images.mean(dim=(2, 3))

    return ConvFeatureNet


def build_conv_feature_net(cfg: ConvNetConfig):
    """An untrained :class:`ConvFeatureNet` for ``cfg`` (used to write test networks too)."""
    return _conv_net_class()(cfg)


def _read_net_config(path: Path) -> ConvNetConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"feature network config {path}: cannot read JSON ({err})") from err
    if not isinstance(raw, dict):
        raise UserError(f"feature network config {path}: expected a JSON object")
    known = {"format", "channels", "in_channels", "kernel_size", "input_size", "input_scale"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"feature network config {path}: unknown field {unknown[0]!r}")
    if raw.get("format") != FEATURE_NET_FORMAT:
        raise UserError(f"feature network config {path}: field 'format' must be "
                        f"{FEATURE_NET_FORMAT!r}, got {raw.get('format')!r}")
    channels = raw.get("channels")
    if (not isinstance(channels, list) or not channels
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)):
        raise UserError(f"feature network config {path}: field 'channels' must be a non-empty "
                        f"list of positive integers, got {channels!r}")
    cfg = ConvNetConfig(channels=channels)
    for name, kind in (("in_channels", int), ("kernel_size", int), ("input_size", int),
                       ("input_scale", (int, float))):
        if name in raw:
            value = raw[name]
            if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                raise UserError(f"feature network config {path}: field {name!r} must be a positive "
                                f"number, got {value!r}")
            setattr(cfg, name, value)
    return cfg


@dataclass
class FeatureNetwork:
    """A loaded feature network plus its input convention."""
    module: object                 # torch.nn.Module or torch.jit.ScriptModule
    input_size: int | None         # images are resized to this square size when set
    input_scale: float             # pixel values are given in [0, input_scale]
    source: str                    # path it came from

    def features(self, images: np.ndarray | Sequence, batch_size: int = 64) -> np.ndarray:
        """float64 features ``[N, D]`` of images: uint8 ``[N, H, W, 3]`` or float ``[N, 3, H, W]``
        in [0, 1] (a torch tensor or an array)."""
        import torch
        import torch.nn.functional as F

        pixels = _images_to_tensor(images)
        out = []
        with torch.no_grad():
            for start in range(0, pixels.shape[0], batch_size):
                batch = pixels[start:start + batch_size]
                if self.input_size is not None and batch.shape[-2:] != (self.input_size, self.input_size):
                    batch = F.interpolate(batch, size=(self.input_size, self.input_size),
                                          mode="bilinear", align_corners=False)
                feats = self.module(batch * self.input_scale)
                if isinstance(feats, (tuple, list)):
                    feats = feats[0]
                out.append(feats.reshape(feats.shape[0], -1).double().cpu().numpy())
        return np.concatenate(out, axis=0)


def _images_to_tensor(images):
    """float32 ``[N, 3, H, W]`` in [0, 1] from uint8 NHWC or float NCHW images."""
    import torch

    pixels = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if pixels.dtype == torch.uint8:
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [N, H, W, 3], got {tuple(pixels.shape)}")
        return pixels.permute(0, 3, 1, 2).float() / 255.0
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"float images must be [N, 3, H, W] in [0, 1], got {tuple(pixels.shape)}")
    return pixels.float()


def _load_safetensors_net(directory: Path) -> FeatureNetwork:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = _read_net_config(directory / "config.json")
    weights_path = directory / "model.safetensors"
    if not weights_path.is_file():
        raise UserError(f"feature network {directory}: missing model.safetensors")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"feature network {weights_path}: not a readable safetensors file ({err})") from err
    module = build_conv_feature_net(cfg)
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if expected != found:
        problem = _state_mismatch(expected, found)
        raise UserError(f"feature network {weights_path}: weights do not match config.json ({problem})")
    module.load_state_dict(state, strict=True)
    module.eval()
    return FeatureNetwork(module, cfg.input_size, float(cfg.input_scale), str(directory))


def _state_mismatch(expected: dict, found: dict) -> str:
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"missing tensor {missing[0]!r}"
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        return f"unexpected tensor {unexpected[0]!r}"
    name = next(n for n in sorted(expected) if expected[n] != found[n])
    return f"tensor {name!r} has shape {found[name]}, expected {expected[name]}"


def _load_torchscript_net(path: Path, input_size: int | None, input_scale: float) -> FeatureNetwork:
    import torch

    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream but still loads
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise UserError(f"feature network {path}: not a TorchScript archive ({err}); plain "
                        f"pickled checkpoints are refused, export with torch.jit.script/trace "
                        f"or use config.json + model.safetensors") from err
    module.eval()
    return FeatureNetwork(module, input_size, float(input_scale), str(path))


def load_feature_network(path: str | Path, input_size: int | None = None,
                         input_scale: float = 1.0) -> FeatureNetwork:
    """Load a feature network for FID from ``path``: a directory (or its ``config.json``) with
    ``model.safetensors``, or a TorchScript file. ``input_size`` / ``input_scale`` apply to
    TorchScript files only (a safetensors network's config.json carries its own)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"feature network not found: {path}")
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        return _load_safetensors_net(path)
    if path.suffix.lower() in TORCHSCRIPT_SUFFIXES:
        return _load_torchscript_net(path, input_size, input_scale)
    raise UserError(f"feature network {path}: expected a directory with config.json + "
                    f"model.safetensors, or a TorchScript file ({', '.join(TORCHSCRIPT_SUFFIXES)})")


def fid(network: FeatureNetwork, images_a, images_b, batch_size: int = 64) -> float:
    """FID of two image sets through ``network`` (see :meth:`FeatureNetwork.features`)."""
    return fid_from_features(network.features(images_a, batch_size), network.features(images_b, batch_size))
