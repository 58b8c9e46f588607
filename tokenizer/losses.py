"""Training losses and metrics for the QLIP tokenizer: CLIP alignment, perceptual, GAN, PSNR.

* :func:`clip_loss` is symmetric InfoNCE over the **global** batch. Embeddings are all-gathered
  across ranks; gradient flows only into this rank's rows (other ranks' rows are constants), the
  same convention as :func:`tokenizer.bsq.distributed_mean`. An optional positives matrix marks
  duplicate captions so they are not treated as negatives.
* :class:`PerceptualLoss` matches unit-normalised features of a frozen local network (e.g.
  blocks of the frozen stage-1 QLIP encoder, :class:`EncoderBlockFeatures`); :class:`LPIPSVGG`
  is LPIPS(VGG16) for users who have its weights as a local file. Nothing is ever downloaded.
* :class:`PatchDiscriminator` plus non-saturating GAN losses, R1 and the VQGAN adaptive weight.
All losses are returned in float32 whatever the input dtype."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmcore.config import ConfigError
from mmcore.errors import UserError

# ---- Config pieces ---------------------------------------------------------------------------

@dataclasses.dataclass
class GANConfig:
    """Adversarial loss settings. ``gan_weight = 0`` disables the discriminator entirely."""

    disc_width: int = 64  # channels of the first discriminator conv (doubles per layer, max 8x)
    disc_layers: int = 3  # stride-2 convs: logits are (B, 1, H / 2**layers, W / 2**layers)
    gan_weight: float = 0.1  # generator loss weight (times the adaptive weight if enabled)
    r1_weight: float = 1.0  # discriminator loss += r1_weight * mean ‖∇_x D(x_real)‖²
    disc_lr_mult: float = 1.0  # discriminator lr = generator lr * disc_lr_mult
    start_step: int = 0  # no GAN terms (and no discriminator updates) before this step
    adaptive_weight: bool = False  # scale gan_weight by ‖∇rec‖/‖∇gan‖ at the decoder's last layer

    def validate(self) -> None:
        rules = (("disc_width", self.disc_width >= 1, ">= 1"),
                 ("disc_layers", self.disc_layers >= 1, ">= 1"),
                 ("gan_weight", self.gan_weight >= 0, ">= 0"),
                 ("r1_weight", self.r1_weight >= 0, ">= 0"),
                 ("disc_lr_mult", self.disc_lr_mult > 0, "> 0"),
                 ("start_step", self.start_step >= 0, ">= 0"))
        for name, ok, rule in rules:
            if not ok:
                raise ConfigError(f"GANConfig.{name} must be {rule}, got {getattr(self, name)}")


@dataclasses.dataclass
class PerceptualConfig:
    """Perceptual loss settings: LPIPS-VGG if ``lpips_path`` is set, else frozen encoder blocks."""

    weight: float = 0.1  # 0 disables the perceptual loss
    layers: tuple[int, ...] = ()  # 0-based encoder block indices; () = every block
    lpips_path: Optional[str] = None  # local .safetensors / .pth with VGG16 features + LPIPS heads
    start_step: int = 0  # no perceptual term before this step (as GANConfig.start_step)

    def validate(self) -> None:
        if not self.weight >= 0:
            raise ConfigError(f"PerceptualConfig.weight must be >= 0, got {self.weight}")
        if self.start_step < 0:
            raise ConfigError(f"PerceptualConfig.start_step must be >= 0, got {self.start_step}")
        if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"PerceptualConfig.layers must be distinct block indices >= 0, got "
                              f"{list(self.layers)}")
        if self.lpips_path is not None and (self.layers or not self.lpips_path.strip()):
            raise ConfigError(f"PerceptualConfig.lpips_path={self.lpips_path!r} must be a file "
                              f"path, and layers (encoder blocks) must then be [] since LPIPS "
                              f"always uses its 5 VGG layers; got layers={list(self.layers)}")


# ---- Cross-rank gathering --------------------------------------------------------------------

def gather_rows(x: torch.Tensor, rescale_local_grad: bool = False) -> torch.Tensor:
    """Concatenate dim-0 rows of ``x`` from every rank in rank order (row counts may differ).
    Other ranks' rows arrive as constants and this rank's slice is ``x`` itself, so gradient
    flows to the local rows only. ``rescale_local_grad`` multiplies that gradient by the world
    size (forward value unchanged): after a data-parallel gradient *average* the parameters
    then receive exactly the gradient of the global loss instead of 1/world of it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    rank, world = dist.get_rank(), dist.get_world_size()
    if rescale_local_grad:
        x = x + (world - 1) * (x - x.detach())  # adds an exact zero; gradient times world
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device))
    sizes = [int(s) for s in sizes]
    padded = x.detach().new_zeros((max(sizes), *x.shape[1:]))  # all_gather needs equal shapes
    padded[: x.shape[0]] = x.detach()
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    chunks = [chunk[:n] for chunk, n in zip(chunks, sizes)]
    chunks[rank] = x
    return torch.cat(chunks)


# ---- CLIP loss -------------------------------------------------------------------------------

class ClipLossOutput(NamedTuple):
    loss: torch.Tensor  # () float32 global-batch loss, identical on every rank
    image_to_text_acc: torch.Tensor  # () float32 detached: images whose top caption is a positive
    text_to_image_acc: torch.Tensor  # () float32 detached: captions whose top image is a positive


def label_ids(labels: Sequence | torch.Tensor) -> torch.Tensor:
    """Per-sample labels -> (B,) int64 ids, equal in every process for equal labels.
    Integers are kept; ``str`` / ``bytes`` are hashed with BLAKE2b (8 bytes): Python's ``hash()``
    is salted per process, so ranks would disagree about which captions are equal."""
    if isinstance(labels, torch.Tensor):
        return labels.reshape(-1).to(torch.int64)
    ids = []
    for label in labels:
        if isinstance(label, str):
            label = label.encode("utf-8")
        if isinstance(label, bytes):
            digest = hashlib.blake2b(label, digest_size=8).digest()
            ids.append(int.from_bytes(digest, "big", signed=True))
        else:
            ids.append(operator.index(label))  # TypeError for anything that is not an integer
    return torch.tensor(ids, dtype=torch.int64)


def gathered_label_ids(labels: Sequence | torch.Tensor, device=None) -> torch.Tensor:
    """(N_global,) int64 :func:`label_ids` of every rank's labels, in rank order. A collective
    when torch.distributed is initialised: call it on every rank, in the same order as
    :func:`clip_loss`. With NCCL pass ``device`` = the embeddings' CUDA device."""
    ids = label_ids(labels)
    return gather_rows(ids if device is None else ids.to(device))


def positives_from_labels(labels: Sequence | torch.Tensor, device=None) -> torch.Tensor:
    """(B_global, B_global) bool, ``[i, j] = label_i == label_j`` over the gathered global batch
    (collective: see :func:`gathered_label_ids`)."""
    ids = gathered_label_ids(labels, device)
    return ids[:, None] == ids[None, :]


def positives_between(row_labels: Sequence | torch.Tensor, column_labels: Sequence | torch.Tensor,
                      device=None) -> torch.Tensor:
    """(R_global, C_global) bool, ``[i, j] = row_label_i == column_label_j``, both gathered over
    ranks (e.g. images against hard-negative captions; collective)."""
    return gathered_label_ids(row_labels, device)[:, None] == gathered_label_ids(column_labels, device)[None, :]


def _soft_target_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(uniform over the row's positives ‖ softmax(row)).
    KL = soft-target cross-entropy minus the target entropy (a constant): same gradient, but its
    minimum is 0 however many duplicates the batch holds, so logged values stay comparable.
    With one positive per row it is exactly the usual cross-entropy."""
    counts = positives.sum(1, keepdim=True).float()
    log_probs = F.log_softmax(logits, dim=1).masked_fill(~positives, 0.0)  # no 0 * -inf
    cross_entropy = -log_probs.sum(1, keepdim=True) / counts
    return (cross_entropy - counts.log()).mean()  # entropy of a uniform target = log(count)


def _top1_is_positive(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    return positives.gather(1, logits.argmax(1, keepdim=True)).float().mean()


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
              positives: torch.Tensor | None = None, *, max_logit_scale: float = 100.0,
              rescale_local_grad: bool = False, negative_embeds: torch.Tensor | None = None,
              negative_positives: torch.Tensor | None = None) -> ClipLossOutput:
    """Symmetric InfoNCE between (b, E) local image and text embeddings, over the global batch.
    ``logit_scale`` is the **log** scale (the raw parameter): logits = min(exp(logit_scale),
    max_logit_scale) * img @ txtᵀ. Embeddings are used as given (the towers L2-normalise).
    ``positives``: optional (B, B) bool over the global batch (see :func:`positives_from_labels`),
    True on the diagonal; each row / column target is uniform over its positives.
    ``rescale_local_grad``: see :func:`gather_rows`.
    ``negative_embeds``: optional (n, E) extra captions with no image of their own (hard
    negatives), gathered like the rest and appended to every image's softmax (image -> text
    only); ``negative_positives`` (B, N) bool over the gathered rows marks any that truly describe
    an image (see :func:`positives_between`; None: none do)."""
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(f"expected image and text embeddings of one (b, E) shape, got "
                         f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
    both = gather_rows(torch.cat([image_embeds, text_embeds], 1).float(), rescale_local_grad)
    images, texts = both.split(image_embeds.shape[1], dim=1)  # one gather for both towers
    scale = logit_scale.float().exp().clamp(max=max_logit_scale).reshape(())
    logits = scale * images @ texts.T  # (B, B): rows = images, columns = captions
    n = logits.shape[0]
    if positives is None:
        positives = torch.eye(n, dtype=torch.bool, device=logits.device)
    elif (positives.shape != (n, n) or positives.dtype != torch.bool
          or not positives.diagonal().all()):
        raise ValueError(f"positives must be a ({n}, {n}) bool matrix over the global batch, True "
                         f"on the diagonal; got {positives.dtype} {tuple(positives.shape)}")
    positives = positives.to(logits.device)
    image_to_text, image_positives = logits, positives
    if negative_embeds is not None:
        negatives = gather_rows(negative_embeds.float(), rescale_local_grad)
        if negative_positives is None:
            negative_positives = torch.zeros((n, negatives.shape[0]), dtype=torch.bool)
        if negative_positives.shape != (n, negatives.shape[0]):
            raise ValueError(f"negative_positives must be ({n}, {negatives.shape[0]}), got "
                             f"{tuple(negative_positives.shape)}")
        image_to_text = torch.cat([logits, scale * images @ negatives.T], dim=1)  # (B, B + N)
        image_positives = torch.cat([positives, negative_positives.to(logits.device)], dim=1)
    loss = 0.5 * (_soft_target_loss(image_to_text, image_positives) + _soft_target_loss(logits.T, positives.T))
    with torch.no_grad():
        i2t = _top1_is_positive(image_to_text, image_positives)
        t2i = _top1_is_positive(logits.T, positives.T)
    return ClipLossOutput(loss, i2t, t2i)


# ---- Perceptual losses -----------------------------------------------------------------------

def _feature_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ‖a/‖a‖ - b/‖b‖‖² along channels (dim 1 of 4-D maps, else last).
    Summing (not averaging) over channels keeps every layer in [0, 4] whatever its width."""
    dim = 1 if a.ndim == 4 else -1
    diff = F.normalize(a.float(), dim=dim, eps=1e-10) - F.normalize(b.float(), dim=dim, eps=1e-10)
    return diff.pow(2).sum(dim).mean()


class PerceptualLoss(nn.Module):
    """LPIPS-like feature matching (no learned heads) through a frozen feature network.
    ``feature_net(images)`` returns a list of feature maps (B, C, H, W) or tokens (B, N, C).
    Target features are computed without autograd; the reconstruction's are differentiated
    w.r.t. the pixels only, which is why a module's parameters must all be frozen."""

    def __init__(self, feature_net: Callable[[torch.Tensor], Sequence[torch.Tensor]]):
        super().__init__()
        params = feature_net.parameters() if isinstance(feature_net, nn.Module) else ()
        if any(p.requires_grad for p in params):
            raise ValueError("PerceptualLoss needs a frozen feature network (it would otherwise "
                             "train it); pass copy.deepcopy(net).requires_grad_(False).eval()")
        self.feature_net = feature_net

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_features = list(self.feature_net(target))
        recon_features = list(self.feature_net(reconstruction))
        if not recon_features or len(recon_features) != len(target_features):
            raise ValueError(f"feature network returned {len(recon_features)} and "
                             f"{len(target_features)} feature tensors")
        return torch.stack([_feature_distance(r, t)
                            for r, t in zip(recon_features, target_features)]).mean()


class EncoderBlockFeatures(nn.Module):
    """Outputs of chosen blocks of a ViT-style encoder (anything with ``.blocks``), as a list.
    Forward hooks that live only during the call reuse the encoder's own forward unchanged and
    leave a shared (frozen) encoder untouched outside this call."""

    def __init__(self, encoder: nn.Module, layers: Iterable[int] = ()):
        super().__init__()
        depth = len(encoder.blocks)
        self.layers = tuple(layers) or tuple(range(depth))
        bad = [i for i in self.layers if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"perceptual layers {bad} out of range for an encoder with {depth} "
                              f"blocks (0-based)")
        self.encoder = encoder

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        captured: dict[int, torch.Tensor] = {}

        def keep(index: int):
            return lambda module, args, output: captured.__setitem__(index, output)

        handles = [self.encoder.blocks[i].register_forward_hook(keep(i)) for i in self.layers]
        try:
            self.encoder(pixels)
        finally:
            for handle in handles:
                handle.remove()
        return [captured[i] for i in self.layers]


_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2 ... relu5_3, as indices into torchvision's features
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_IGNORED_KEY_PREFIXES = ("classifier.", "scaling_layer.")  # torchvision head, LPIPS constants
_KEY_RENAMES = (  # files from the lpips package -> this module's names
    (re.compile(r"^lin(\d)\.model\.1\.weight$"), r"heads.\1.weight"),
    (re.compile(r"^net\.slice\d\.(\d+)\.(weight|bias)$"), r"features.\1.\2"),
)


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features[:30]``: same module indices, so its keys load as-is."""
    modules: list[nn.Module] = []
    channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            modules.append(nn.MaxPool2d(2, 2))
        else:
            modules += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
            channels = item
    return nn.Sequential(*modules)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"LPIPS weights file not found: {path} (weights are never downloaded; "
                        f"set perceptual.lpips_path to a local file or null)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickle refused by weights_only, ...
        raise UserError(f"{path}: cannot read LPIPS weights: {err}") from None
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: expected a flat mapping of names to tensors")
    return dict(state)


def _rename_key(key: str) -> str:
    for pattern, replacement in _KEY_RENAMES:
        key = pattern.sub(replacement, key)
    return key


class LPIPSVGG(nn.Module):
    """LPIPS v0.1 with a VGG16 trunk, frozen, for images in [-1, 1]; weights from a local file.
    The file holds torchvision-style ``features.N.weight/bias`` plus the LPIPS heads
    (``lin{k}.model.1.weight`` as in the lpips package's ``vgg.pth``, or ``heads.{k}.weight``);
    e.g. merge torchvision's VGG16 state dict with lpips' ``vgg.pth`` and save it once."""

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)
        # LPIPS' ScalingLayer constants: inputs in [-1, 1] -> roughly ImageNet-normalised.
        shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPSVGG":
        path = Path(path)
        state = {_rename_key(k): v for k, v in _read_state_dict(path).items()
                 if not k.startswith(_IGNORED_KEY_PREFIXES)}
        model = cls()
        expected = model.state_dict()
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [f"{k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
                     for k, v in expected.items() if k in state and state[k].shape != v.shape]
        if problems:
            raise UserError(f"{path}: not LPIPS-VGG16 weights ({len(problems)} problems): "
                            + "; ".join(problems[:5]))
        model.load_state_dict(state)
        return model

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images.float() - self.shift) / self.scale
        taps = []
        for index, module in enumerate(self.features):
            x = module(x)
            if index in _LPIPS_TAPS:
                taps.append(x)
        return taps

    def distances(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) LPIPS distance per image."""
        with torch.no_grad():
            target_taps = self._taps(target)
        total = 0.0
        for head, r, t in zip(self.heads, self._taps(reconstruction), target_taps):
            diff = (F.normalize(r, dim=1, eps=1e-10) - F.normalize(t, dim=1, eps=1e-10)).pow(2)
            total = total + head(diff).mean(dim=(1, 2, 3))
        return total

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.distances(reconstruction, target).mean()


def build_perceptual_loss(config: PerceptualConfig,
                          encoder: nn.Module | None = None) -> nn.Module:
    """``module(reconstruction, target) -> ()`` loss: LPIPS-VGG if ``config.lpips_path``, else
    block features of ``encoder``. An encoder that still trains is snapshotted (frozen deep
    copy, taken now); an already frozen one (stage 2) is shared, not copied."""
    config.validate()
    if config.lpips_path is not None:
        return LPIPSVGG.from_file(config.lpips_path)
    if encoder is None:
        raise ValueError("the encoder-feature perceptual loss needs the frozen encoder")
    if any(p.requires_grad for p in encoder.parameters()):
        encoder = copy.deepcopy(encoder).requires_grad_(False).eval()
    return PerceptualLoss(EncoderBlockFeatures(encoder, config.layers))


# ---- GAN -------------------------------------------------------------------------------------

def _num_groups(channels: int, max_groups: int = 32) -> int:
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``layers`` stride-2 4x4 convs (width doubling up to 8x) and a 3x3 conv to one
    logit per patch. GroupNorm instead of BatchNorm: per-sample statistics keep D(x_i) a
    function of x_i alone, so the R1 gradient penalty is a clean per-image quantity."""

    def __init__(self, width: int = 64, layers: int = 3, in_channels: int = 3):
        super().__init__()
        self.layers = layers
        modules: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers):
            out = width * min(2 ** i, 8)
            modules += [nn.Conv2d(channels, out, 4, 2, 1, bias=False),  # GroupNorm adds the bias
                        nn.GroupNorm(_num_groups(out), out), nn.LeakyReLU(0.2)]
            channels = out
        modules.append(nn.Conv2d(channels, 1, 3, 1, 1))
        self.net = nn.Sequential(*modules)

    @classmethod
    def from_config(cls, config: GANConfig) -> "PatchDiscriminator":
        config.validate()
        return cls(config.disc_width, config.disc_layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1], H and W divisible by 2**layers -> (B, 1, H/2**l, W/2**l)."""
        factor = 2 ** self.layers
        if images.ndim != 4 or images.shape[-1] % factor or images.shape[-2] % factor:
            raise ValueError(f"expected (B, C, H, W) images with H, W divisible by {factor}, got "
                             f"{tuple(images.shape)}")
        return self.net(images)


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean softplus(-D(fake))``."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean softplus(-D(real)) + mean softplus(D(fake))`` (pass detached fakes)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def r1_penalty(real_images: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ‖∇_x Σ D(x)‖² (sum over patch logits), differentiable in D.
    ``real_images`` must have ``requires_grad=True`` before ``real_logits = D(real_images)``."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def adaptive_gan_weight(recon_loss: torch.Tensor, gan_loss: torch.Tensor,
                        last_layer_weight: torch.Tensor, max_weight: float = 1e4,
                        eps: float = 1e-4) -> torch.Tensor:
    """VQGAN's ``‖∇_w rec‖ / (‖∇_w gan‖ + eps)`` at the decoder's last layer, clamped, detached.
    Multiply ``gan_weight`` by it: it balances the two terms' gradient scales at the output."""
    (rec_grad,) = torch.autograd.grad(recon_loss, last_layer_weight, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


# ---- Pixel losses and metrics ----------------------------------------------------------------

def mse_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """() float32 mean squared error, on the [-1, 1] pixel scale."""
    return F.mse_loss(reconstruction.float(), target.float())


def psnr(reconstruction: torch.Tensor, target: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """() float32 mean over images of PSNR in dB, for [-1, 1] images measured on [0, 1]:
    per image ``10 log10(1 / mse01)``, ``mse01 = mse / 4``; identical images give ``max_db``."""
    mse01 = (reconstruction.float() - target.float()).pow(2).flatten(1).mean(1) / 4.0
    return (10.0 * torch.log10(1.0 / mse01.clamp_min(10.0 ** (-max_db / 10.0)))).mean()
