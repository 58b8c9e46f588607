"""The tokenizer's optimisation step for both stages: engines, loss terms, checkpoints.

:class:`StageRunner` owns the DeepSpeed engine of the tokenizer and, in stage 2 with a GAN, the
patch discriminator. ``step()`` runs one optimizer step over the accumulation micro-batches and
returns this rank's loss terms as floats (the caller averages across ranks).

The discriminator is deliberately *not* a DeepSpeed engine: its R1 penalty needs
``torch.autograd.grad`` through it, which fires DeepSpeed's post-backward hooks as if a backward
pass had run (ZeRO-2 then fails reducing an empty bucket). It is small, so plain AdamW with a
gradient all-reduce is enough, and its state goes into our own checkpoint file.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import torch.distributed as tdist

from mmcore.errors import UserError
from mmcore.io import atomic_output_path
from tokenizer.losses import (PatchDiscriminator, build_perceptual_loss, discriminator_loss, generator_loss,
                              r1_penalty)
from tokenizer.qlip import QLIP
from train import ds_engine
from train.distributed import get_rank
from train.faults import StepGuard
from train.tokenizer_config import LossWeights  # also re-exported from here (it used to live here)
from train.tokenizer_data import ImageTextBatch, with_negatives
from train.tokenizer_loss import stage1_loss_terms

DISC_FILE = "discriminator.pt"


class StageRunner:
    """Engines and loss computation for one run of stage 1 or stage 2."""

    def __init__(self, cfg, model: QLIP, weights: LossWeights, optim: ds_engine.OptimConfig,
                 lr_mults: dict[str, float]):
        self.cfg, self.weights, self.stage = cfg, weights, cfg.stage
        self.use_text = self.stage == 1 and weights.align > 0 and model.text is not None
        self.perceptual = None
        if self.stage == 2 and cfg.perceptual.weight > 0:
            # the encoder is frozen in stage 2: a private copy keeps it out of ZeRO's partitioning
            self.perceptual = build_perceptual_loss(cfg.perceptual, copy.deepcopy(model.encoder))
        self.engine = ds_engine.build_engine(model, optim, cfg.engine, lr_mults)
        self.disc = self.disc_optimizer = None
        self.last_skip: str | None = None  # why the last step was skipped (StepGuard), None if applied
        if self.stage == 2 and cfg.gan.gan_weight > 0:
            torch.manual_seed(cfg.seed + 1)  # same discriminator init on every rank
            self.disc = PatchDiscriminator.from_config(cfg.gan).to(self.engine.device)
            self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=optim.lr * cfg.gan.disc_lr_mult,
                                                    betas=tuple(optim.betas), eps=optim.eps)

    @property
    def model(self) -> QLIP:
        return self.engine.module

    # -- losses ---------------------------------------------------------------------------------
    def _generator_terms(self, batch: ImageTextBatch, step: int) -> tuple[torch.Tensor, dict]:
        pixels = batch.pixels.to(self.engine.device)
        text_ids = mask = None
        if self.use_text:
            text_ids, mask = with_negatives(batch)
            text_ids, mask = text_ids.to(pixels.device), mask.to(pixels.device)
        decode_count = self.cfg.recon_images(len(pixels))
        out = self.engine(pixels, text_ids, mask, decode_count)
        real = pixels[:decode_count]  # the images the reconstruction terms compare against
        # recon·MSE + quantizer·BSQ (+ align·CLIP with text): the stage-1 loss, shared with the bench
        total, terms = stage1_loss_terms(self.model, out, pixels, batch.labels, self.weights,
                                         batch.negative_labels if self.use_text else None)
        if self.perceptual is not None and step >= self.cfg.perceptual.start_step:
            perceptual = self.perceptual(out.reconstruction, real)
            total = total + self.cfg.perceptual.weight * perceptual
            terms["perceptual"] = perceptual
        if self.disc is not None and step >= self.cfg.gan.start_step:
            # D's weights enter as constants: the generator loss must not train the discriminator
            frozen = {name: p.detach() for name, p in self.disc.named_parameters()}
            fake_logits = torch.func.functional_call(self.disc, frozen, (out.reconstruction,))
            gan = generator_loss(fake_logits)
            total = total + self.cfg.gan.gan_weight * gan
            terms["gan_g"] = gan
        terms["total"] = total
        return total, {**terms, "_fake": out.reconstruction.detach(), "_real": real}

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict:
        real = real.detach().requires_grad_(True)
        real_logits = self.disc(real)
        fake_logits = self.disc(fake)
        d_loss = discriminator_loss(real_logits, fake_logits)
        r1 = r1_penalty(real, real_logits)
        self.disc_optimizer.zero_grad(set_to_none=True)
        (d_loss + self.cfg.gan.r1_weight * r1).backward()
        average_gradients(self.disc)
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.cfg.optim.grad_clip)
        self.disc_optimizer.step()
        return {"gan_d": d_loss.detach(), "r1": r1.detach()}

    def step(self, micro_batches: list[ImageTextBatch], step: int,
             guard: StepGuard | None = None) -> dict[str, float]:
        """One optimizer step (generator, then discriminator when active); returns mean terms.

        With a :class:`~train.faults.StepGuard`, a non-finite loss on any rank skips the step on
        every rank (no backward, no generator or discriminator update); the terms then cover only
        the micro-batches that were applied (empty when the whole step was skipped) and
        ``self.last_skip`` holds the reason (None when the step was applied).
        """
        sums: dict[str, float] = {}
        used = 0
        if guard is not None:
            guard.begin(step + 1)
        for batch in micro_batches:
            total, terms = self._generator_terms(batch, step)
            if guard is None:
                self.engine.backward(total)
                self.engine.step()
            elif not guard.backward_and_step(self.engine, total, batch.keys):
                continue  # skipped (non-finite loss on some rank): no discriminator step either
            real, fake = terms.pop("_real"), terms.pop("_fake")
            if self.disc is not None and step >= self.cfg.gan.start_step:
                terms.update(self._discriminator_step(real, fake))
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            used += 1
        self.last_skip = guard.end(self.engine) if guard is not None else None
        return {key: value / used for key, value in sums.items()} if used else {}

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, checkpoint_dir: Path, step: int, positions: list[int], keep_last: int = 0,
             time_budget: dict | None = None) -> None:
        state = {"positions": positions, "weights": dataclasses.asdict(self.weights), "time_budget": time_budget}

        def write_disc(directory: Path) -> None:  # inside the checkpoint before it is committed
            if self.disc is not None and get_rank() == 0:  # replicated: one copy is enough
                with atomic_output_path(directory / DISC_FILE) as tmp:
                    torch.save({"model": self.disc.state_dict(), "optimizer": self.disc_optimizer.state_dict()}, tmp)

        ds_engine.save_checkpoint(self.engine, checkpoint_dir, step, state, keep_last=keep_last,
                                  write_extra=write_disc)

    def load(self, checkpoint_dir: Path, tag: str | None = None) -> dict:
        tag = tag or ds_engine.resume_checkpoint_tag(checkpoint_dir)
        state = ds_engine.load_checkpoint(self.engine, checkpoint_dir, tag)
        if self.disc is not None:
            path = checkpoint_dir / tag / DISC_FILE
            if not path.is_file():
                raise UserError(f"checkpoint has no discriminator state: {path}")
            disc_state = torch.load(path, weights_only=True, map_location=self.engine.device)
            self.disc.load_state_dict(disc_state["model"])
            self.disc_optimizer.load_state_dict(disc_state["optimizer"])
        return state


def average_gradients(module: torch.nn.Module) -> None:
    """Data-parallel mean of ``module``'s gradients (no-op without a process group)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    flat /= tdist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()
