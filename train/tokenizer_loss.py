"""The tokenizer's stage-1 objective ``recon·MSE + quantizer·BSQ + align·CLIP``, without DeepSpeed.

One function, :func:`stage1_loss_terms`, shared by the DeepSpeed trainer
(:class:`train.tokenizer_steps.StageRunner`, which adds stage 2's perceptual and GAN terms on top)
and plain-PyTorch tools such as ``bench/tokenizer_sweep.py``, so both optimise exactly the same
loss. It takes the model's forward output rather than running the forward itself: under DeepSpeed
the forward must go through the engine.
"""
from __future__ import annotations

from typing import Sequence

import torch

from tokenizer.losses import clip_loss, gathered_label_ids, mse_loss, psnr
from tokenizer.qlip import QLIP, QLIPOutput
from train.tokenizer_config import LossWeights


def stage1_loss_terms(model: QLIP, out: QLIPOutput, pixels: torch.Tensor, labels: Sequence,
                      weights: LossWeights, negative_labels: Sequence | None = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total loss, named terms) for one batch: ``recon·MSE + quantizer·BSQ`` plus ``align·CLIP``
    when the forward had text (``out.text_embeds`` is not None).

    ``model`` is the bare :class:`QLIP` (its learnable ``logit_scale`` and config feed the CLIP
    loss); ``labels`` are the batch's positive labels (equal labels = mutual positives, so
    duplicate captions are not negatives). The CLIP loss runs over the global batch when a process
    group exists (a collective then). Terms: recon, quantizer, psnr_db, code_entropy_bits,
    codebook_entropy, per_sample_entropy and, with text, align, i2t_acc, t2i_acc (and code_align,
    code_i2t_acc with ``weights.code_align``); the caller adds
    ``total``. ``negative_labels`` (hard negatives, :mod:`unified_mm.data.hard_negatives`): the
    forward's text rows beyond the batch's images are captions without an image, scored as extra
    negatives for every image (positives where their label matches); every rank must pass them or
    none, since they are gathered.
    """
    decoded = pixels[: out.reconstruction.shape[0]]  # the forward may decode only the first images
    recon = mse_loss(out.reconstruction, decoded)
    total = weights.recon * recon + weights.quantizer * out.bsq.loss
    terms = {"recon": recon, "quantizer": out.bsq.loss, "psnr_db": psnr(out.reconstruction.detach(), decoded),
             "code_entropy_bits": out.bsq.used_entropy_bits,
             "codebook_entropy": out.bsq.codebook_entropy, "per_sample_entropy": out.bsq.per_sample_entropy}
    if out.text_embeds is not None:
        image_ids = gathered_label_ids(labels, device=pixels.device)  # (B_global,), gathered once
        positives = image_ids[:, None] == image_ids[None, :]
        batch = pixels.shape[0]
        text_embeds, negative_embeds = out.text_embeds[:batch], out.text_embeds[batch:]  # (B, E), (N, E)
        negative_positives = None
        if negative_labels is not None:
            negative_ids = gathered_label_ids(negative_labels, device=pixels.device)  # (N_global,)
            negative_positives = image_ids[:, None] == negative_ids[None, :]
        elif negative_embeds.shape[0]:
            raise ValueError(f"{negative_embeds.shape[0]} text rows beyond the batch's {batch} images "
                             f"but no negative_labels")
        def contrast(embeds: torch.Tensor):  # [CLS] and the codes: the same texts, negatives, scale
            return clip_loss(embeds, text_embeds, model.logit_scale, positives,
                             max_logit_scale=model.config.max_logit_scale, rescale_local_grad=True,
                             negative_embeds=negative_embeds if negative_labels is not None else None,
                             negative_positives=negative_positives)

        clip = contrast(out.image_embeds)
        total = total + weights.align * clip.loss
        terms.update(align=clip.loss, i2t_acc=clip.image_to_text_acc, t2i_acc=clip.text_to_image_acc)
        if weights.code_align > 0:
            if out.code_embeds is None:
                raise ValueError("weights.code_align > 0 needs a model with a code head (model.code_head: true)")
            codes = contrast(out.code_embeds)
            total = total + weights.code_align * codes.loss
            terms.update(code_align=codes.loss, code_i2t_acc=codes.image_to_text_acc)
    return total, terms
