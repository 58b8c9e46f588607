"""Typed config of QLIP tokenizer training (both stages), without DeepSpeed.

The schema behind ``configs/tokenizer/*.yaml``: :class:`TokenizerTrainConfig` with its
:class:`LossWeights` and :class:`BalanceConfig`, plus :func:`lr_prefixes` (per-part learning-rate
multipliers -> parameter-name prefixes). Kept apart from ``train/tokenizer.py`` (which imports
DeepSpeed) so plain-PyTorch tools such as ``bench/tokenizer_sweep.py`` can load the same YAML on a
machine without ``deepspeed``; ``train.tokenizer`` and ``train.tokenizer_steps`` re-export them.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from mmcore.config import ConfigError
from tokenizer.losses import GANConfig, PerceptualConfig
from tokenizer.qlip import PARTS
from train.faults import validate_fault_config
from train.optim import EngineConfig, OptimConfig
from train.tokenizer_data import TokenizerDataConfig


@dataclasses.dataclass
class LossWeights:
    """Weights of the stage-1/2 terms (QLIP: αr, αa, αq). MSE is on [-1, 1] pixels."""

    recon: float = 100.0
    align: float = 1.0
    quantizer: float = 1.0
    # CLIP term on the codes' own embedding (QLIPConfig.code_head), beside align's on [CLS]
    code_align: float = 0.0

    def validate(self) -> None:
        if min(self.recon, self.align, self.quantizer, self.code_align) < 0:
            raise ConfigError(f"weights must be >= 0, got {self}")


@dataclasses.dataclass
class BalanceConfig:
    mode: Literal["fixed", "auto"] = "fixed"
    pilot_steps: int = 100  # steps of each pilot run (recon-only, align-only)
    pilot_tail: int = 10  # final loss = mean over the pilot's last steps


@dataclasses.dataclass
class TokenizerTrainConfig:
    stage: int = 1
    preset: str = "tiny"
    model: dict = dataclasses.field(default_factory=dict)  # overrides on the preset (stage 1)
    init_from: Optional[str] = None  # stage 2: the stage-1 export directory
    # stage 2: also freeze the bottleneck's down MLP, so every image keeps its stage-1 codes (the
    # codes code_align trained to name the objects); only the up MLP and the decoder train
    freeze_codes: bool = False
    data: TokenizerDataConfig = dataclasses.field(default_factory=TokenizerDataConfig)
    weights: LossWeights = dataclasses.field(default_factory=LossWeights)
    balance: BalanceConfig = dataclasses.field(default_factory=BalanceConfig)
    perceptual: PerceptualConfig = dataclasses.field(default_factory=PerceptualConfig)
    gan: GANConfig = dataclasses.field(default_factory=GANConfig)
    lr_mult: dict[str, float] = dataclasses.field(default_factory=dict)  # part name -> multiplier
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    # Fraction of each micro-batch that is decoded and scored by the reconstruction terms (MSE,
    # perceptual, GAN); every image still feeds the contrastive and BSQ terms. The decoder costs as
    # much as the encoder, so < 1 buys steps for a time budget, though in the demo's stage 1 it cost
    # zero-shot accuracy (configs/tokenizer/tiny_stage1.yaml).
    recon_fraction: float = 1.0
    steps: int = 1000  # with time_budget_s: the most steps the plan may reach
    # > 0: train for about this many seconds of training-loop wall time (not the balancing pilots);
    # the step count is planned from the measured step time and the LR schedule ends on it
    time_budget_s: float = 0.0
    log_every: int = 10
    save_every: int = 0  # 0: checkpoint only at the end
    eval_images: int = 1000
    seed: int = 0
    out_dir: str = "runs/tokenizer"
    resume: bool = True  # continue from out_dir/checkpoints when it holds one
    stop_at: int = 0  # > 0: checkpoint and exit after this step (a planned interruption); rerun to resume
    keep_last: int = 3  # complete checkpoints kept in out_dir/checkpoints (0: all)
    max_skip_fraction: float = 0.1  # stop when more of the samples read were skipped as unusable
    max_nonfinite_steps: int = 5  # stop after this many steps in a row with a non-finite loss/gradient

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {self.stage}")
        if self.stage == 2 and not self.init_from:
            raise ConfigError("stage 2 needs init_from=<stage-1 export directory>")
        # stage 2 has no text tower: align and code_align (inherited from stage 1's YAML) go unused
        if self.stage == 1 and self.weights.code_align > 0 and not self.model.get("code_head"):
            raise ConfigError("weights.code_align > 0 aligns the codes' embedding with text: it needs "
                              "model.code_head: true")
        if self.stage == 1 and self.freeze_codes:
            raise ConfigError("freeze_codes=true freezes the codes of a stage-1 export: stage 2 only")
        if self.stage == 2 and self.balance.mode == "auto":
            raise ConfigError("balance.mode=auto balances alignment vs reconstruction: stage 1 only")
        unknown = sorted(set(self.lr_mult) - set(PARTS))
        if unknown:
            raise ConfigError(f"lr_mult has unknown parts {unknown}; parts: {', '.join(PARTS)}")
        if not 0 < self.recon_fraction <= 1:
            raise ConfigError(f"recon_fraction must be in (0, 1], got {self.recon_fraction}")
        if self.steps < 1 or self.log_every < 1:
            raise ConfigError("steps and log_every must be >= 1")
        if self.time_budget_s < 0:
            raise ConfigError(f"time_budget_s must be >= 0, got {self.time_budget_s}")
        if not 0 <= self.stop_at <= self.steps:
            raise ConfigError(f"stop_at must be in [0, steps={self.steps}], got {self.stop_at}")
        validate_fault_config(self.max_skip_fraction, self.max_nonfinite_steps, self.keep_last)

    def recon_images(self, batch: int) -> int:
        """How many of a micro-batch's ``batch`` images are decoded and reconstruction-scored (the
        first ones; at least one)."""
        return max(1, min(batch, round(batch * self.recon_fraction)))


def lr_prefixes(lr_mult: dict[str, float]) -> dict[str, float]:
    """``{"text": 3.0}`` -> ``{"text.": 3.0}``: part multipliers as parameter-name prefixes."""
    return {prefix: mult for part, mult in lr_mult.items() for prefix in PARTS[part]}
