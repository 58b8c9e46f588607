"""Zero-shot classification with the QLIP contrastive path (CLIP-style prompt ensembles)."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mmcore.text_tokenizer import TextTokenizer
from tokenizer.qlip import QLIP


class ZeroShotOutput(NamedTuple):
    predictions: torch.Tensor  # (B,) int64 class index
    probabilities: torch.Tensor  # (B, C) softmax over classes


def encode_prompts(text_tokenizer: TextTokenizer, prompts: Sequence[str],
                   context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> right-padded ``<bos> text <eos>`` ids (N, T) and attention mask (N, T), the
    layout the text tower is trained on (:meth:`TextTokenizer.encode_pooled`)."""
    rows = [text_tokenizer.encode_pooled(p, context_length) for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), text_tokenizer.pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def class_embeddings(model: QLIP, text_tokenizer: TextTokenizer,
                     prompts_per_class: Sequence[Sequence[str]]) -> torch.Tensor:
    """(C, E) unit class embeddings: the mean of each class's prompt embeddings, renormalised."""
    if model.text is None:
        raise ValueError("this tokenizer has no text tower (stage-2 export); zero-shot needs stage 1's")
    flat = [p for prompts in prompts_per_class for p in prompts]
    ids, mask = encode_prompts(text_tokenizer, flat, model.config.text.context_length)
    embeds = model.encode_text(ids.to(next(model.parameters()).device), mask.to(ids.device))
    counts = [len(p) for p in prompts_per_class]
    per_class = torch.stack([chunk.mean(0) for chunk in embeds.split(counts)])
    return F.normalize(per_class, dim=-1)


@torch.no_grad()
def zero_shot_classify(model: QLIP, pixels: torch.Tensor, class_embeds: torch.Tensor) -> ZeroShotOutput:
    """Classify (B, 3, H, W) images in [-1, 1] against (C, E) class embeddings."""
    image_embeds = model.encode_image_embeds(pixels)
    logits = model.get_logit_scale() * image_embeds @ class_embeds.T
    return ZeroShotOutput(logits.argmax(-1), logits.softmax(-1))
