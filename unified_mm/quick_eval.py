"""Quick checks of a unified model used during and right after training.

* :func:`heldout_losses`: per-task modality-separated loss on a fixed held-out set (the training
  eval hook; its values at step 0 and at the end show how much each task learned).
* :func:`greedy_vqa_accuracy`: greedy answers to held-out ShapesWorld questions, exact match
  after lower-casing and stripping (the full VQA metrics live in ``eval/``).
* :func:`caption_gain`: how much given captions lower the loss of their true images'
  ids (teacher forced), in nats per image (``eval/`` reports it beside text-to-image).
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from unified_mm.data.mixture import UNCONDITIONAL_T2I, text_gain
from unified_mm.generate import greedy_text
from unified_mm.loss import modality_token_losses
from unified_mm.sequence import ImageCodes, Sequence, SequenceBuilder, Turn, collate
from unified_mm.tokenizer_cli import read_precomputed
from unified_mm.vocab import Vocab


@torch.no_grad()
def heldout_losses(model: torch.nn.Module, vocab: Vocab, sequences: dict[str, list[Sequence]], *,
                   pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Mean loss per labelled token, per task (model may be a DeepSpeed engine: called as is)."""
    device = next(model.parameters()).device
    out = {}
    for task, seqs in sequences.items():
        total, count = 0.0, 0
        for start in range(0, len(seqs), batch_size):
            batch = collate(seqs[start: start + batch_size], pad_id)
            logits = model(input_ids=batch.ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
            token_losses = modality_token_losses(logits, batch.labels.to(device), vocab)
            total += float(token_losses.losses.sum())
            count += int(token_losses.mask.sum())
        out[task] = total / count if count else math.nan
    return out


@torch.no_grad()
def caption_gain(model: torch.nn.Module, builder: SequenceBuilder, captioned: list[tuple[str, ImageCodes]], *,
                 pad_id: int, batch_size: int = 32) -> float | None:
    """Loss of each image's ids after an empty caption minus after its caption, summed over the
    ids a text-to-image sequence scores and averaged over the images (nats per image); None for
    no images. ``captioned``: (caption, codes (N, G)) pairs. See :func:`text_gain`."""
    if not captioned:
        return None
    held = {"t2i": [builder.generation(caption, codes) for caption, codes in captioned],
            UNCONDITIONAL_T2I: [builder.generation("", codes, drop_caption=True) for _, codes in captioned]}
    if any(seq is None for seq in held["t2i"] + held[UNCONDITIONAL_T2I]):
        raise ValueError(f"max_length {builder.max_length} cannot hold an image sequence")
    losses = heldout_losses(model, builder.vocab, held, pad_id=pad_id, batch_size=batch_size)
    return text_gain(losses, held)


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def greedy_vqa_accuracy(model: LlamaForCausalLM, builder: SequenceBuilder, codes_dir: str | Path,
                        split: str, *, tokenizer_hash: str | None, max_questions: int = 500,
                        batch_size: int = 64, seed: int = 0) -> dict:
    """Exact-match accuracy of greedy answers, overall and per question type.

    One question per image (chosen by a seeded RNG), images in file order.
    """
    text_tokenizer = builder.text_tokenizer
    questions = []
    for index, (_, codes, meta) in enumerate(read_precomputed(codes_dir, split, tokenizer_hash, split_by_rank=False)):
        qa = [p for p in meta.get("qa", []) if isinstance(p, dict) and p.get("question")]
        if not qa:
            continue
        pair = random.Random(f"vqa/{seed}/{index}").choice(qa)
        prompt = builder.chat_prompt([Turn("user", str(pair["question"]), codes)])
        questions.append((prompt, str(pair["answer"]), str(pair.get("type", "all"))))
        if len(questions) >= max_questions:
            break
    correct: dict[str, list[int]] = {}
    examples = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start: start + batch_size]
        answers = greedy_text(model, builder.vocab, [q[0] for q in chunk], pad_id=text_tokenizer.pad_id,
                              eos_id=text_tokenizer.eos_id, max_new_tokens=16)
        for (_, truth, kind), answer_ids in zip(chunk, answers):
            answer = text_tokenizer.decode(answer_ids)
            hit = int(normalise_answer(answer) == normalise_answer(truth))
            correct.setdefault(kind, []).append(hit)
            if len(examples) < 8:
                examples.append({"truth": truth, "answer": answer, "type": kind})
    hits = [h for values in correct.values() for h in values]
    return {"accuracy": sum(hits) / len(hits) if hits else math.nan, "questions": len(hits),
            "by_type": {k: sum(v) / len(v) for k, v in sorted(correct.items())}, "examples": examples}
