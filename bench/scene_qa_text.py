"""Diagnostic: does the decoder find the object a question names when the scene is *text*?

The unified model answers ShapesWorld questions about one-object images well but does not find the
object a question names among several ("What colour is the circle?" gets the colour of some
object). This script takes the image out of the question: the scene is given as its long caption
("a large red circle on the right and a small yellow cross in the bottom right"), and the same
tiny Llama, optimiser and loss learn ``<user> {caption}. {question} <assistant> {answer}`` from
scratch. If the text version fails the same way, what is missing is the lookup itself (a
question-dependent attention the decoder must learn), not the image tokens.

    python bench/scene_qa_text.py --codes runs/demo10/codes --tokenizer runs/demo10/tokenizer_stage2/export \\
        --steps 1500 --lr 1e-3 --out runs/scene_qa_text.jsonl

``--question-first`` puts the question before the caption (every scene token can then attend to
the question). ``--qa-types yesno`` trains on those question types only (the evaluation still asks
every type), to set beside ``bench/unified_budget.py``'s ``yesno_only_*`` variants on image ids.
Greedy accuracy on val, by question type and one-object vs several-object images, is appended to
``--out`` as one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mmcore.text_tokenizer import TextTokenizer  # noqa: E402
from train.optim import WarmupCosine, param_groups  # noqa: E402
from unified_mm.generate import greedy_text  # noqa: E402
from unified_mm.loss import modality_token_losses, weighted_mean_loss  # noqa: E402
from unified_mm.model import UnifiedModelConfig, build_model  # noqa: E402
from unified_mm.sequence import SequenceBuilder, Turn, collate  # noqa: E402
from unified_mm.tokenizer_cli import read_manifest, read_precomputed  # noqa: E402
from unified_mm.vocab import Vocab  # noqa: E402

LONG_CAPTION = 1  # ShapesWorld captions: [short, long (every object, size and place), sentence]


def prompt_text(meta: dict, question: str, question_first: bool) -> str:
    scene = meta["captions"][LONG_CAPTION]
    return f"{question} {scene}." if question_first else f"{scene}. {question}"


def evaluate(model, samples, builder: SequenceBuilder, text: TextTokenizer, question_first: bool) -> dict:
    model.eval()
    tally = collections.defaultdict(lambda: [0, 0])
    items = [(meta, qa) for meta in samples for qa in meta["qa"]]
    for start in range(0, len(items), 64):
        chunk = items[start:start + 64]
        prompts = [builder.chat_prompt([Turn("user", prompt_text(meta, qa["question"], question_first), None)])
                   for meta, qa in chunk]
        with torch.no_grad():
            answers = greedy_text(model, builder.vocab, prompts, pad_id=text.pad_id, eos_id=text.eos_id,
                                  max_new_tokens=4)
        for (meta, qa), answer in zip(chunk, answers):
            correct = text.decode(answer).strip() == str(qa["answer"])
            group = "1obj" if len(meta["objects"]) == 1 else "multi"
            for key in ("all", f"{qa['type']}/{group}"):
                tally[key][0] += correct
                tally[key][1] += 1
    model.train()
    return {key: round(right / total, 4) for key, (right, total) in sorted(tally.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codes", required=True, help="precomputed codes directory (its metadata is the data)")
    parser.add_argument("--tokenizer", required=True, help="QLIP export with text_tokenizer.model")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of matrices (default 0.1)")
    parser.add_argument("--question-first", action="store_true", help="question before the scene text")
    parser.add_argument("--qa-types", default="", help="train only on these question types, comma-separated "
                        "(e.g. yesno); the evaluation still asks every type (default: all types)")
    parser.add_argument("--val-images", type=int, default=300, help="val images asked every question (default 300)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="JSONL file the result line is appended to")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text = TextTokenizer(Path(args.tokenizer) / "text_tokenizer.model")
    manifest = read_manifest(args.codes)
    vocab = Vocab.for_tokenizers(text.vocab_size, manifest["num_bits"], manifest["group_size"], manifest["grid_size"])
    builder = SequenceBuilder(text, vocab, max_length=224)
    qa_types = {t for t in args.qa_types.split(",") if t}
    train = [meta for _, _, meta in read_precomputed(args.codes, "train", split_by_rank=False)]
    if qa_types:  # keep each scene's questions of those types; drop scenes without any
        train = [{**meta, "qa": [qa for qa in meta["qa"] if qa["type"] in qa_types]} for meta in train]
        train = [meta for meta in train if meta["qa"]]
        if not train:
            parser.error(f"no training question has a type in {sorted(qa_types)}")
    val = [meta for _, _, meta in islice(read_precomputed(args.codes, "val", split_by_rank=False), args.val_images)]
    model = build_model(UnifiedModelConfig(preset="tiny"), vocab)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, args.lr), lr=args.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(50, args.steps, 0.1))
    rng, start = random.Random(0), time.perf_counter()
    for step in range(1, args.steps + 1):
        sequences = []
        for _ in range(args.batch):
            meta = rng.choice(train)
            qa = rng.choice(meta["qa"])
            sequences.append(builder.chat([Turn("user", prompt_text(meta, qa["question"], args.question_first), None),
                                           Turn("assistant", str(qa["answer"]))]))
        batch = collate(sequences, text.pad_id)
        logits = model(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
        loss = weighted_mean_loss(modality_token_losses(logits, batch.labels, vocab), batch.labels, vocab)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    accuracy = evaluate(model, val, builder, text, args.question_first)
    record = {"steps": args.steps, "lr": args.lr, "batch": args.batch, "weight_decay": args.weight_decay,
              "question_first": args.question_first, "qa_types": sorted(qa_types),
              "seconds": round(time.perf_counter() - start, 1), "accuracy": accuracy}
    print(json.dumps(record))
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
