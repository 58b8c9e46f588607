"""DeepSpeed engines from our typed configs, step-tagged checkpoints and fp32 consolidation.

Division of labour between the two config sources:

* ``configs/deepspeed/*.json`` hold only *how* state is sharded: ZeRO stage, bucket sizes,
  offload, logging cadence. They never hold ``"auto"`` (that is an HF-Trainer convention which
  ``deepspeed.initialize`` does not understand) and never hold values that a run's YAML owns.
* The run's YAML (:class:`OptimConfig`, :class:`EngineConfig`) owns everything that changes the
  maths: learning rate and schedule, batch shape, clipping, precision. :func:`resolve_ds_config`
  injects those into the loaded JSON, so one JSON serves every job.

The optimizer is a plain ``torch.optim.AdamW`` (ZeRO supports it natively): DeepSpeed's own
CPU Adam would JIT-compile for about a minute on first use. ``optim.name: muon`` gives
:class:`train.optim.MuonAdamW` instead, which needs ZeRO stage 0 in fp32
(``configs/deepspeed/zero0.json``): ZeRO 1-3 and DeepSpeed's bf16 optimizer hand a client
optimizer flattened 1-D partitions, and Muon orthogonalises whole matrices.

The config dataclasses, the optimizer's parameter groups and the warm-up/cosine schedule live in
the deepspeed-free :mod:`train.optim` and are re-exported here, as are the checkpoint-directory
helpers of :mod:`train.checkpoint_dirs` (tags, completion markers, ``latest``, rotation).

Checkpoints are crash-safe (:func:`save_checkpoint`): each is written into
``.partial-step_XXXXXXXX``, gets a ``checkpoint_complete.json`` listing its files, is renamed to
``step_XXXXXXXX`` and only then does ``latest`` (replaced atomically) name it; resume takes
``latest`` when that checkpoint is complete, else the newest complete one, and ``keep_last`` rotates
old ones. Every checkpoint file is read with ``torch.load(weights_only=True)``
(:func:`weights_only_loading`), DeepSpeed's own reads included.

Notes on the shipped JSONs (JSON has no comments): ``overlap_comm`` is off because CPU/gloo has
no side streams to overlap with; ``stage3_param_persistence_threshold`` is 1e4 instead of the
1e5 default so that even the tiny smoke models really get partitioned under ZeRO-3;
``steps_per_print`` is huge because our trainers log themselves.
"""
from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from mmcore.config import ConfigError
from mmcore.errors import UserError
from mmcore.io import atomic_output_path, atomic_write_text
from train import faults
from train.checkpoint_dirs import (LATEST_FILE, PARTIAL_PREFIX, checkpoint_tag, clean_partial_checkpoints,  # noqa: F401
                                   complete_checkpoints, find_latest_tag, fsync_path, is_complete, latest_tag,
                                   remove_checkpoint_dir, resume_checkpoint_tag, rng_file, rotate_checkpoints,
                                   step_of_tag, write_complete_marker)
from train.distributed import barrier, get_rank, print_rank0, rng_state, set_rng_state, warn
# deepspeed-free pieces (above: checkpoint directories; below: optimizer and configs),
# re-exported so ``ds_engine.OptimConfig``, ``ds_engine.latest_tag`` etc. keep working
from train.optim import (EngineConfig, OptimConfig, SplitRanks, WarmupCosine, build_optimizer,  # noqa: F401
                         build_scheduler, param_groups)

REPO_ROOT = Path(__file__).resolve().parent.parent

# Keys the run's YAML owns; a DeepSpeed JSON that sets them would silently fight the YAML.
YAML_OWNED_KEYS = {
    "train_batch_size": "engine.micro_batch_size / engine.grad_accum_steps",
    "train_micro_batch_size_per_gpu": "engine.micro_batch_size",
    "gradient_accumulation_steps": "engine.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "engine.precision",
    "fp16": "engine.precision",
    "optimizer": "optim.*",
    "scheduler": "optim.*",
}
TRAINER_STATE_KEY = "trainer_state"  # our namespace inside DeepSpeed's client_state
# Scripts DeepSpeed copies next to every checkpoint; they load pickles unrestricted, so we remove them.
UNSAFE_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON
# ---------------------------------------------------------------------------------------------

def resolve_path(path: str | Path) -> Path:
    """Absolute, else relative to the working directory, else relative to the repo root."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def _find_auto(tree: Any, where: str = "") -> str | None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            found = _find_auto(value, f"{where}.{key}" if where else key)
            if found:
                return found
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found = _find_auto(value, f"{where}[{i}]")
            if found:
                return found
    elif tree == "auto":
        return where
    return None


def load_ds_json(path: str | Path) -> dict:
    """Read a DeepSpeed JSON and check it holds only sharding/offload/logging settings."""
    path = resolve_path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config not found: {path}")
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: top level must be an object")
    owned = sorted(set(tree) & set(YAML_OWNED_KEYS))
    if owned:
        hints = ", ".join(f"{key} -> {YAML_OWNED_KEYS[key]}" for key in owned)
        raise UserError(f"{path}: these keys belong in the run's YAML, not the DeepSpeed JSON: {hints}")
    auto_key = _find_auto(tree)
    if auto_key:
        raise UserError(f"{path}: {auto_key} is \"auto\"; deepspeed.initialize needs real values")
    return tree


def use_bf16(precision: str) -> bool:
    if precision == "bf16" and not torch.cuda.is_available():
        raise UserError("engine.precision=bf16 needs CUDA; use auto or fp32 on CPU")
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def resolve_ds_config(engine_cfg: EngineConfig, optim_cfg: OptimConfig) -> dict:
    """The JSON from ``engine_cfg.deepspeed_config`` with our YAML values injected.

    ``train_batch_size`` is left out on purpose: DeepSpeed derives it as
    micro batch x accumulation x data-parallel world size, so it can never disagree.
    """
    ds_config = load_ds_json(engine_cfg.deepspeed_config)
    ds_config["train_micro_batch_size_per_gpu"] = engine_cfg.micro_batch_size
    ds_config["gradient_accumulation_steps"] = engine_cfg.grad_accum_steps
    ds_config["gradient_clipping"] = optim_cfg.grad_clip
    ds_config["bf16"] = {"enabled": use_bf16(engine_cfg.precision)}
    return ds_config


def build_engine(model: torch.nn.Module, optim_cfg: OptimConfig, engine_cfg: EngineConfig,
                 lr_mults: dict[str, float] | None = None,
                 ds_config: dict | None = None) -> deepspeed.DeepSpeedEngine:
    """Wrap ``model`` with AdamW + warm-up/cosine LambdaLR in a DeepSpeed engine.

    The process group must already exist (:func:`train.distributed.init_distributed`). Every rank
    must pass identically initialised weights (seed before building the model).
    """
    ds_config = ds_config or resolve_ds_config(engine_cfg, optim_cfg)
    check_optimizer_fits(optim_cfg, ds_config, engine_cfg.deepspeed_config)
    split = muon_split_ranks() if optim_cfg.name == "muon" else None
    optimizer = build_optimizer(model, optim_cfg, lr_mults, split=split)
    if split is not None:
        print_rank0(f"Muon: Newton-Schulz split across {split.world_size} ranks")
    scheduler = build_scheduler(optimizer, optim_cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    return engine


def muon_split_ranks() -> SplitRanks | None:
    """The data-parallel ranks that share Muon's Newton-Schulz work (train.optim.Muon), or None
    for one process. Muon runs under ZeRO stage 0 only, where every rank holds the averaged
    gradients of the whole model, so the ranks of the default group are the data-parallel ones."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return SplitRanks(dist.get_rank(), dist.get_world_size(), dist.all_reduce)


def check_optimizer_fits(optim_cfg: OptimConfig, ds_config: dict, source: str | Path) -> None:
    """Muon steps whole weight matrices; only ZeRO stage 0 in fp32 leaves them whole. AdamW needs
    ZeRO >= 1: stage 0 in fp32 has no overflow check, so non-finite gradients would be applied
    (:class:`train.optim.MuonAdamW` checks its gradients itself)."""
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if optim_cfg.name != "muon":
        if stage == 0:
            raise ConfigError(f"{source} gives ZeRO stage 0, which is for optim.name=muon: with AdamW use "
                              f"stage >= 1 (configs/deepspeed/zero1.json, zero2.json), whose overflow check "
                              f"skips steps with non-finite gradients")
        return
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    if stage != 0 or bf16:
        raise ConfigError(f"optim.name=muon needs ZeRO stage 0 in fp32 (e.g. engine.deepspeed_config="
                          f"configs/deepspeed/zero0.json, engine.precision=fp32); {source} gives stage {stage}"
                          f"{' with bf16' if bf16 else ''}: DeepSpeed then hands the optimizer flattened "
                          f"1-D partitions, and Muon needs the matrices")


def zero_stage(engine: deepspeed.DeepSpeedEngine) -> int:
    return int(engine.zero_optimization_stage())


def current_lr(engine: deepspeed.DeepSpeedEngine) -> float:
    return float(engine.get_lr()[0])


# ---------------------------------------------------------------------------------------------
# Training step and parameter access
# ---------------------------------------------------------------------------------------------

def hf_loss(output: Any) -> torch.Tensor:
    """Loss of a ``transformers`` model called with ``labels``."""
    return output.loss


def train_step(engine: deepspeed.DeepSpeedEngine, micro_batches: Iterable[dict],
               loss_fn: Callable[[Any], torch.Tensor] = hf_loss) -> float:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns this rank's mean loss.

    ``engine.step()`` is called after every micro-batch: DeepSpeed only applies the optimizer
    (and advances the LR schedule) at the accumulation boundary.
    """
    micro_batches = list(micro_batches)
    if len(micro_batches) != engine.gradient_accumulation_steps():
        # Fewer would leave gradients accumulated into the next step; more would step twice.
        raise ValueError(f"got {len(micro_batches)} micro-batches for "
                         f"gradient_accumulation_steps={engine.gradient_accumulation_steps()}")
    losses = []
    for batch in micro_batches:
        batch = {key: value.to(engine.device) for key, value in batch.items()}
        loss = loss_fn(engine(**batch))
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float().item())
    return sum(losses) / len(losses)


def full_state_dict(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of every parameter: the optimizer's fp32 master weights when present.

    Master weights, not the module's tensors, because under bf16 the module holds rounded copies
    while checkpoints and :func:`consolidate_fp32` hold the masters. Frozen parameters (no
    master) fall back to the module tensor, gathered from ZeRO-3 shards. A collective: every rank
    must call it. Parameters are assembled one at a time, so peak memory stays at one full tensor
    beyond the shards.
    """
    out = {}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param) if param.requires_grad else None
        if master is not None:
            out[name] = master.detach().float().cpu().clone()
        elif hasattr(param, "ds_id"):  # a ZeRO-3 partitioned parameter
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                out[name] = param.detach().float().cpu().clone()
        else:
            out[name] = param.detach().float().cpu().clone()
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest element-wise difference between two state dicts (inf if keys or shapes differ)."""
    if a.keys() != b.keys():
        return math.inf
    worst = 0.0
    for key, tensor in a.items():
        other = b[key]
        if tensor.shape != other.shape:
            return math.inf
        worst = max(worst, (tensor.float() - other.float()).abs().max().item())
    return worst


# ---------------------------------------------------------------------------------------------
# Checkpoints (the directory bookkeeping is in train/checkpoint_dirs.py)
# ---------------------------------------------------------------------------------------------

def save_checkpoint(engine: deepspeed.DeepSpeedEngine, checkpoint_dir: str | Path, step: int,
                    trainer_state: dict | None = None, *, keep_last: int = 0,
                    write_extra: Callable[[Path], None] | None = None) -> str:
    """Save engine + optimizer + scheduler under tag ``step_XXXXXXXX``, crash-safely; returns the tag.

    ``trainer_state`` (data position etc.) travels in DeepSpeed's client_state with ``step``
    added. RNG states differ per rank but DeepSpeed writes client_state from rank 0 only, so each
    rank writes its own RNG file into the tag directory. ``write_extra(directory)`` (called on
    every rank) adds files of the caller's own (e.g. a discriminator). Collective: every rank must
    call it.

    Crash safety: everything is written into ``.partial-step_XXXXXXXX``; after a barrier rank 0
    lists the files in ``checkpoint_complete.json``, renames the directory to ``step_XXXXXXXX``
    and only then replaces the ``latest`` pointer (temporary file + rename). A kill at any moment
    leaves the previous checkpoint complete and findable (:func:`latest_tag`). Afterwards the
    ``keep_last`` newest complete checkpoints are kept (:func:`rotate_checkpoints`; 0 keeps all).
    """
    checkpoint_dir = Path(checkpoint_dir)
    tag = checkpoint_tag(step)
    partial_tag = PARTIAL_PREFIX + tag
    partial = checkpoint_dir / partial_tag
    rank = get_rank()
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a leftover of a run killed while saving this step
    barrier()
    state = {"step": step, "saved_at": time.time(), **(trainer_state or {})}
    engine.save_checkpoint(str(checkpoint_dir), tag=partial_tag, client_state={TRAINER_STATE_KEY: state},
                           save_latest=False)
    with atomic_output_path(rng_file(checkpoint_dir, partial_tag, rank)) as tmp:
        torch.save(rng_state(), tmp)
    if write_extra is not None:
        write_extra(partial)
    barrier()  # every rank's shards, RNG file and extras are in the partial directory
    faults.kill_in_save(step)  # TEST HOOK: QLIP_FAULT_KILL_IN_SAVE (a crash mid-save)
    if rank == 0:
        write_complete_marker(partial, tag, step)
        final = checkpoint_dir / tag
        if final.exists():  # the same step saved again (e.g. a rerun after stop_at)
            remove_checkpoint_dir(final)
        os.replace(partial, final)
        fsync_path(checkpoint_dir)
        atomic_write_text(checkpoint_dir / LATEST_FILE, tag)
        fsync_path(checkpoint_dir)
        rotate_checkpoints(checkpoint_dir, keep_last, step)
        for script in UNSAFE_RECOVERY_SCRIPTS:  # they unpickle with weights_only=False if run by hand
            (checkpoint_dir / script).unlink(missing_ok=True)  # consolidate_fp32 is the safe route
    barrier()  # nobody reads the checkpoint directory before it is committed
    return tag


def _safe_checkpoint_globals() -> list:
    """The few non-tensor classes DeepSpeed's ZeRO checkpoints pickle (plain data holders), and
    ``builtins.getattr`` narrowed to :func:`_enum_member` (see there)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, (_enum_member, "builtins.getattr")]


def _enum_member(cls, name: str):
    """What ``builtins.getattr`` may do while a checkpoint loads: name a member of an allow-listed
    enum, nothing else.

    Why: Python 3.11.2 (Debian's ``python3``) pickles an enum member as ``getattr(EnumClass,
    "name")`` (3.11.7 as ``EnumClass(value)``), so a ZeRO checkpoint written under it holds
    ``builtins.getattr`` and a venv made from that Python could not resume (found in session 22:
    ``make demo`` failed at its DeepSpeed smoke run). The real ``getattr`` is not allowed: with it
    a checkpoint could walk from any allowed object to any attribute (a function's globals, a module).
    """
    allowed_enums = [g for g in _safe_checkpoint_globals() if isinstance(g, type) and issubclass(g, enum.Enum)]
    if cls not in allowed_enums or not isinstance(name, str) or name not in cls.__members__:
        raise pickle.UnpicklingError(f"getattr({getattr(cls, '__name__', type(cls).__name__)}, {name!r}) is not "
                                     "allowed while loading a checkpoint: only members of allow-listed enums")
    return cls[name]


@contextlib.contextmanager
def weights_only_loading():
    """Make every ``torch.load`` inside the block ``weights_only=True`` (no pickle code execution).

    DeepSpeed reads its checkpoints with ``weights_only=False``; inside this block those reads
    (and ``zero_to_fp32``'s) only accept tensors, containers, primitives and the allow-listed
    DeepSpeed data classes of :func:`_safe_checkpoint_globals`. Not thread-safe: it swaps
    ``torch.load`` for the duration (loading happens before training threads exist).
    """
    original = torch.load
    allowed = _safe_checkpoint_globals()

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def _refused(path: Path, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"checkpoint {path}: refused to load: {first} (checkpoints are read with "
                     "torch.load(weights_only=True); only tensors and plain data are accepted)")


def load_checkpoint(engine: deepspeed.DeepSpeedEngine, checkpoint_dir: str | Path,
                    tag: str | None = None, restore_rng: bool = True) -> dict:
    """Load weights, optimizer and scheduler state into ``engine``; return the trainer state.

    ``tag`` defaults to :func:`resume_checkpoint_tag` (``latest`` if complete, else the newest
    complete checkpoint). Every file is read with ``weights_only=True``. Collective: every rank
    must call it.
    """
    tag = tag or resume_checkpoint_tag(checkpoint_dir)
    if tag is None:
        raise UserError(f"no complete checkpoint in {checkpoint_dir}")
    if not (Path(checkpoint_dir) / tag).is_dir():
        raise UserError(f"checkpoint {Path(checkpoint_dir) / tag} does not exist")
    try:
        with weights_only_loading():
            load_path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    except pickle.UnpicklingError as err:
        raise _refused(Path(checkpoint_dir) / tag, err) from None
    if load_path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {Path(checkpoint_dir) / tag}")
    if restore_rng:
        rng_path = rng_file(Path(checkpoint_dir), tag, get_rank())
        if rng_path.is_file():
            set_rng_state(torch.load(rng_path, weights_only=True))
        else:  # e.g. resuming on more ranks than were saved
            warn(f"no RNG state for this rank in {rng_path.parent}; keeping the current RNG")
    return dict((client_state or {}).get(TRAINER_STATE_KEY, {}))


def consolidate_fp32(checkpoint_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Merge a ZeRO-1/2/3 checkpoint's shards into one fp32 CPU state dict (no process group).

    Works from the files alone, so it can run on one rank of a job or offline afterwards. Files
    are read with ``weights_only=True``. A ZeRO stage-0 checkpoint (no optimizer shards; fp32,
    see :func:`check_optimizer_fits`) holds the whole fp32 module in its model-states file, which
    ``zero_to_fp32`` does not read, so that file's module is returned.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or latest_tag(checkpoint_dir)
    if not (checkpoint_dir / tag).is_dir():
        raise UserError(f"checkpoint {checkpoint_dir / tag} does not exist")
    try:
        with weights_only_loading():
            if not list((checkpoint_dir / tag).glob("*optim_states.pt")):
                return _stage0_module(checkpoint_dir / tag)
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    except pickle.UnpicklingError as err:
        raise _refused(checkpoint_dir / tag, err) from None
    return dict(state)


def _stage0_module(tag_dir: Path) -> dict[str, torch.Tensor]:
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {tag_dir}: neither ZeRO optimizer shards nor {path.name}")
    module = torch.load(path, map_location="cpu", weights_only=True)["module"]
    not_fp32 = sorted(k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32)
    if not_fp32:
        raise UserError(f"checkpoint {tag_dir}: a stage-0 checkpoint with non-fp32 weights ({not_fp32[0]}: "
                        f"{module[not_fp32[0]].dtype}) holds no fp32 master copy to consolidate")
    return dict(module)


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors, atomically.

    safetensors refuses tensors that share storage (tied embeddings come back from consolidation
    as one tensor under two names), so later aliases are cloned; unique tensors are not copied.
    """
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(ptr)
        tensors[name] = tensor
    path = Path(path)
    with atomic_output_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def save_ds_config(ds_config: dict, path: str | Path) -> Path:
    """Record the resolved DeepSpeed config next to a run's outputs."""
    return atomic_write_text(Path(path), json.dumps(ds_config, indent=2, sort_keys=True) + "\n")
