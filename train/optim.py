"""Optimizer, learning-rate schedule and batch/precision settings, without DeepSpeed.

The dataclasses a run's YAML holds (:class:`OptimConfig`, :class:`EngineConfig`) and the pieces
every trainer builds from them (:func:`param_groups`, :class:`WarmupCosine`). They live here, not in
:mod:`train.ds_engine`, so that plain-PyTorch tools (e.g. ``bench/tokenizer_sweep.py``) can import
them on machines without ``deepspeed``; ``train.ds_engine`` re-exports every name.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Callable, Literal, NamedTuple

import torch

from mmcore.config import ConfigError
from mmcore.machine import cpu_has_amx_bf16


@dataclasses.dataclass
class OptimConfig:
    """AdamW (or Muon + AdamW) with linear warm-up then cosine decay to ``min_lr_ratio * lr``."""
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # "muon": weight matrices whose names match `muon_params` (fnmatch patterns, e.g.
    # "model.layers.*") step with Muon (torch.optim.Muon: momentum, then the update orthogonalised
    # by Newton-Schulz), every other parameter with AdamW, under one schedule (:class:`MuonAdamW`).
    # Muon's step is scaled to AdamW's RMS ("match_rms_adamw"), so `lr` and `weight_decay` serve both.
    name: Literal["adamw", "muon"] = "adamw"
    muon_params: tuple[str, ...] = ()
    muon_momentum: float = 0.95
    # Precision of Muon's Newton-Schulz iterations: "auto" = bfloat16 (as torch.optim.Muon always
    # does) on CUDA and on CPUs with AMX-BF16, float32 elsewhere. On a CPU without bf16 matrix units
    # (Skylake-SP, 2 cores) bf16 is emulated: the iterations ran 3.3-6.2x slower than in float32 on
    # the demo's matrix shapes and took about half of a tokenizer training step; in float32 the
    # same 60 s budgets fitted 1.69x the tokenizer and 1.61x the unified steps
    # (session 21, docs/notes/session21.md).
    muon_ns_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.1

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(f"need 0 <= optim.warmup_steps ({self.warmup_steps}) <= "
                              f"optim.total_steps ({self.total_steps}) and total_steps >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        if self.name == "muon" and not self.muon_params:
            raise ConfigError("optim.name is muon but optim.muon_params is empty: name the weight "
                              "matrices Muon should step (fnmatch patterns, e.g. 'model.layers.*')")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.muon_ns_dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"optim.muon_ns_dtype must be auto, float32 or bfloat16, got {self.muon_ns_dtype!r}")


@dataclasses.dataclass
class EngineConfig:
    """Which DeepSpeed JSON to use and the batch/precision values injected into it."""
    deepspeed_config: str = "configs/deepspeed/zero2.json"  # relative to cwd or the repo root
    micro_batch_size: int = 4  # per rank, per forward pass
    grad_accum_steps: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # On CPU, run the training forward under bf16 autocast (weights, gradients, optimizer and the
    # loss stay fp32; evaluation stays fp32). "auto": only where the CPU has AMX-BF16 tiles, which
    # multiply bf16 ~6x faster than fp32 (1,070 vs 163 GFLOP/s, 2048^2, 1 thread); without AMX,
    # bf16 matmuls are slower than fp32 (../shared/ENV-NOTES.md). Used by the unified trainer.
    cpu_autocast: Literal["none", "bf16", "auto"] = "none"

    def validate(self) -> None:
        if self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ConfigError("engine.micro_batch_size and engine.grad_accum_steps must be >= 1")


def cpu_autocast_dtype(engine_cfg: EngineConfig, device: torch.device | str) -> torch.dtype | None:
    """The dtype the training forward autocasts to on this CPU, or None (fp32 / not a CPU)."""
    if torch.device(device).type != "cpu" or engine_cfg.cpu_autocast == "none":
        return None
    if engine_cfg.cpu_autocast == "auto" and not cpu_has_amx_bf16():
        return None
    return torch.bfloat16


class WarmupCosine:
    """LR multiplier: linear warm-up, then cosine from 1 to ``min_ratio``; flat after the end.

    A class rather than a closure so ``LambdaLR.state_dict`` (and thus the checkpoint) records
    its parameters.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float,
                 lr_mults: dict[str, float] | None = None,
                 muon_params: tuple[str, ...] = ()) -> list[dict]:
    """Trainable parameters grouped by (lr multiplier, decay[, Muon]).

    Matrices decay; biases, norms and other 1-D tensors do not. ``lr_mults`` maps parameter-name
    prefixes to learning-rate multipliers (first match wins, default 1), e.g. a slower encoder.
    ``muon_params``: fnmatch patterns; a matching 2-D parameter goes to a group with
    ``use_muon=True`` (every group then carries the flag).
    """
    lr_mults = lr_mults or {}
    groups: dict[tuple[float, bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = next((m for prefix, m in lr_mults.items() if name.startswith(prefix)), 1.0)
        muon = param.ndim == 2 and any(fnmatch.fnmatchcase(name, pattern) for pattern in muon_params)
        groups.setdefault((mult, param.ndim >= 2, muon), []).append(param)
    ordered = sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1], not kv[0][2]))
    if muon_params and not any(muon for (_, _, muon) in groups):
        raise ConfigError(f"optim.muon_params {list(muon_params)} match no trainable 2-D parameter")
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * mult,
             **({"use_muon": muon} if muon_params else {})}
            for (mult, decay, muon), params in ordered]


def newton_schulz(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's orthogonalisation of a 2-D ``update`` (the quintic iteration of torch.optim.Muon),
    computed in ``dtype``; the same operations in the same order as torch's, which hard-codes
    bfloat16."""
    a, b, c = coefficients
    ortho = update.to(dtype, copy=True)
    tall = update.size(0) > update.size(1)
    if tall:
        ortho = ortho.T  # now rows <= cols, so the Gram matrix below is the smaller of the two
    ortho.div_(ortho.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = ortho @ ortho.T
        ortho = torch.addmm(ortho, torch.addmm(gram, gram, gram, beta=b, alpha=c), ortho, beta=a)
    return ortho.T if tall else ortho


def closure_loss(closure) -> torch.Tensor | None:
    """The loss of an optimizer step's optional ``closure``, evaluated with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def muon_lr(lr: float, shape: torch.Size) -> float:
    """torch.optim.Muon's ``adjust_lr_fn="match_rms_adamw"``: an update of AdamW's RMS."""
    return lr * 0.2 * math.sqrt(max(shape[0], shape[1]))


class SplitRanks(NamedTuple):
    """Data-parallel ranks that split Muon's Newton-Schulz work (:class:`Muon`): this rank, how
    many, and an in-place sum over them (e.g. ``deepspeed.comm.all_reduce``)."""
    rank: int
    world_size: int
    all_reduce: Callable[[torch.Tensor], object]


def split_owners(shapes: list[torch.Size], world_size: int) -> list[int]:
    """The rank that orthogonalises each matrix: largest Newton-Schulz cost (rows · cols ·
    min(rows, cols)) first, each to the least-loaded rank (ties: the lower rank). Deterministic,
    so every rank computes the same assignment from the same shapes."""
    load = [0] * world_size
    owners = [0] * len(shapes)
    costs = [shape[0] * shape[1] * min(shape[0], shape[1]) for shape in shapes]
    for index in sorted(range(len(shapes)), key=lambda i: -costs[i]):  # stable: ties keep their order
        rank = min(range(world_size), key=lambda r: load[r])
        owners[index] = rank
        load[rank] += costs[index]
    return owners


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (Nesterov momentum, ``match_rms_adamw`` step size, decoupled weight
    decay) with the Newton-Schulz precision chosen per parameter (:attr:`OptimConfig.muon_ns_dtype`)
    and, under data parallelism, the Newton-Schulz work split across the ranks (``split``).

    Written out rather than used as is because torch's step casts every update to bfloat16 for the
    iterations, with no option; where the CPU has no bf16 matrix units that is the slowest part of
    a training step. With ``ns_dtype="bfloat16"`` the step equals torch's exactly
    (tests/test_optim.py); the state (``momentum_buffer``) is torch's, so checkpoints load in either.

    ``split``: every rank holds the same averaged gradients (ZeRO stage 0), so every rank would
    orthogonalise every matrix. Instead each orthogonalises its share (:func:`split_owners`) into
    a zeroed flat buffer, one all-reduce (a sum in which each entry has one non-zero term, so
    exact) gives every rank every update, and all ranks apply them; the momentum buffers are
    updated on every rank, so each holds the whole state. The same updates, bit for bit, as
    without splitting (tests/test_muon_split.py), at 1/world of the Newton-Schulz time plus one
    all-reduce of the Muon parameters' size (the tiny unified preset on 2 one-thread CPU ranks:
    the optimizer step 105-116 ms unsplit, 66-77 ms split; bench/bench_muon_split.py).
    """

    def __init__(self, params, ns_dtype: str = "auto", split: SplitRanks | None = None, **kwargs):
        super().__init__(params, adjust_lr_fn="match_rms_adamw", **kwargs)
        self.ns_dtype = ns_dtype
        self.split = split if split is not None and split.world_size > 1 else None
        self._cpu_amx: bool | None = None  # read from /proc/cpuinfo once, at the first step

    def ns_dtype_for(self, param: torch.Tensor) -> torch.dtype:
        if self.ns_dtype == "auto":  # bf16 where it is native (and where torch's choice was measured)
            if param.is_cuda:
                return torch.bfloat16
            if self._cpu_amx is None:
                self._cpu_amx = cpu_has_amx_bf16()
            return torch.bfloat16 if self._cpu_amx else torch.float32
        return getattr(torch, self.ns_dtype)

    def momentum_update(self, group: dict, param: torch.Tensor) -> torch.Tensor:
        """Advance ``param``'s momentum buffer with its gradient; the (Nesterov) update to orthogonalise."""
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.lerp_(param.grad, 1 - group["momentum"])
        return param.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def orthogonalise(self, group: dict, param: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                             self.ns_dtype_for(param))

    def split_orthogonalise(self, work: list[tuple[dict, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """This rank's share of ``work`` (group, param, update) orthogonalised, everyone's gathered
        by one all-reduce of a flat buffer (float32: exact for bf16 and float32 results)."""
        owners = split_owners([param.shape for _, param, _ in work], self.split.world_size)
        sizes = [param.numel() for _, param, _ in work]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=work[0][1].device)
        pieces = list(flat.split(sizes))  # views into flat
        for (group, param, update), owner, piece in zip(work, owners, pieces):
            if owner == self.split.rank:
                piece.copy_(self.orthogonalise(group, param, update).reshape(-1))
        self.split.all_reduce(flat)
        return [piece.view(param.shape) for (_, param, _), piece in zip(work, pieces)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        work = [(group, param, self.momentum_update(group, param))
                for group in self.param_groups for param in group["params"] if param.grad is not None]
        if not work:
            return loss
        if self.split is not None:
            orthos = self.split_orthogonalise(work)
        else:
            orthos = [self.orthogonalise(group, param, update) for group, param, update in work]
        for (group, param, _), ortho in zip(work, orthos):
            lr = float(group["lr"])
            param.mul_(1 - lr * group["weight_decay"])
            param.add_(ortho, alpha=-muon_lr(lr, param.shape))
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over groups flagged ``use_muon``: :class:`Muon` steps those, AdamW the rest.

    One object, so one LR schedule, one ``state_dict`` and one DeepSpeed client optimizer (ZeRO
    stage 0 only: ZeRO 1-3 flatten parameters into 1-D partitions, and Muon needs the matrices).
    The two inner optimizers share this one's group dicts and state, as DeepSpeed's own
    ``MuonWithAuxAdam`` does, so a scheduler that sets ``group["lr"]`` reaches both.

    A step whose gradients are not all finite is skipped and sets ``overflow``: DeepSpeed's
    engine then reports the step as not applied and holds the LR schedule, as ZeRO's own overflow
    check does (stage 0 in fp32 has none, and NaN gradients would otherwise reach the weights).
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 momentum: float = 0.95, ns_dtype: str = "auto", split: SplitRanks | None = None):
        muon_groups = [g for g in groups if g["use_muon"]]
        adam_groups = [g for g in groups if not g["use_muon"]]
        # the inner constructors fill each group dict with their defaults, in place
        self._muon = (Muon(muon_groups, ns_dtype=ns_dtype, split=split, lr=lr, momentum=momentum)
                      if muon_groups else None)
        self._adam = torch.optim.AdamW(adam_groups, lr=lr, betas=betas, eps=eps) if adam_groups else None
        super().__init__(muon_groups + adam_groups, {})
        self.overflow = False
        self._link()

    def _link(self) -> None:
        for inner, flag in ((self._muon, True), (self._adam, False)):
            if inner is not None:
                inner.param_groups = [g for g in self.param_groups if g["use_muon"] is flag]
                inner.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()  # loading replaced the group dicts and the state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.nn.utils.get_total_norm(grads).isfinite())
        if self.overflow:
            return loss
        for inner in (self._muon, self._adam):
            if inner is not None:
                inner.step()
        return loss


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig,
                    lr_mults: dict[str, float] | None = None,
                    split: SplitRanks | None = None) -> torch.optim.Optimizer:
    """AdamW, or :class:`MuonAdamW` for ``optim.name=muon``; ``split``: data-parallel ranks that
    share Muon's Newton-Schulz work (ignored for AdamW and for one rank)."""
    if cfg.name == "muon":
        groups = param_groups(model, cfg.weight_decay, cfg.lr, lr_mults, tuple(cfg.muon_params))
        return MuonAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, momentum=cfg.muon_momentum,
                         ns_dtype=cfg.muon_ns_dtype, split=split)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr, lr_mults), lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio))
