"""Bench tool (not a trainer): how the unified model's held-out VQA accuracy grows with training steps.

    python bench/unified_budget.py --codes runs/demo/codes --tokenizer runs/demo/tokenizer_stage2/export \\
        --variants mix_2k,mix_6k --device cuda --out runs/unified_budget

The CPU demo trains the tiny unified model for a few hundred steps; this runs the same model,
data stream (``MixedTaskStream``), templates and modality-separated loss for many more steps in a
plain single-process PyTorch loop (bf16 autocast on CUDA), so a GPU box without DeepSpeed can
answer "how many steps does VQA need?". Variants run as parallel subprocesses (``--jobs``).
Accuracy is exact match of the *teacher-forced* argmax over text ids at every answer position
(answer tokens and ``<eos>``): it equals greedy decoding's exact match, since greedy output is the
truth iff every step's argmax given the true prefix is the true token — and it needs one forward
per batch and no KV cache. Rows go to ``<out>/budget.jsonl`` as variants finish, and every
``--eval-every`` point of each variant's curve to ``<out>/budget_curve.jsonl`` as it is measured
(a first GPU attempt with a hard time limit lost every row because nothing was written until the end).
The variants themselves are the table in ``bench/unified_budget_variants.py``.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mmcore.text_tokenizer import TextTokenizer  # noqa: E402
from tokenizer.export import tokenizer_hash  # noqa: E402
from train.optim import OptimConfig, WarmupCosine, build_optimizer  # noqa: E402
from unified_mm.data.mixture import MixedTaskStream, MixtureConfig, SourceConfig, eval_sequences, text_gain  # noqa: E402
from unified_mm.quick_eval import heldout_losses  # noqa: E402
from unified_mm.loss import modality_token_losses, modality_token_losses_from_hidden, weighted_mean_loss  # noqa: E402
from unified_mm.model import UnifiedModelConfig, build_model  # noqa: E402
from unified_mm.sequence import IGNORE_INDEX, TASKS, SequenceBuilder, collate  # noqa: E402
from unified_mm.tokenizer_cli import read_manifest, read_precomputed  # noqa: E402
from unified_mm.vocab import Vocab  # noqa: E402

from bench.unified_budget_variants import VARIANTS  # noqa: E402


class PromptImageBuilder(SequenceBuilder):
    """Bench-only: the image ids (and ``<eoi>``) of a user turn are labelled like a generated image."""

    def _user(self, text_ids, image_codes):
        segment = super()._user(text_ids, image_codes)
        if image_codes is None:
            return segment
        span = len(self._image_span(image_codes))  # <boi> ids <eoi>, right after <user>
        labels = list(segment.labels)
        labels[2: 1 + span] = segment.ids[2: 1 + span]  # image ids and <eoi>; <boi> stays a prompt
        return segment._replace(labels=labels)


class QuestionLabelBuilder(SequenceBuilder):
    """Bench-only: in conversations (vqa, caption, chat) a user turn's text ids are labelled, so
    the model learns to predict the question; text-to-image captions stay prompts."""

    _label_user_text = False  # True only while a conversation is rendered

    def chat(self, turns, task="chat"):
        self._label_user_text = True
        try:
            return super().chat(turns, task)
        finally:
            self._label_user_text = False

    def _user(self, text_ids, image_codes):
        segment = super()._user(text_ids, image_codes)
        if not self._label_user_text or not text_ids:
            return segment
        labels = list(segment.labels)
        labels[-len(text_ids):] = text_ids  # the text is the turn's tail, after <user> and any image
        return segment._replace(labels=labels)


class TextFirstBuilder(SequenceBuilder):
    """Bench-only: a user turn is ``<user> text [<boi> img <eoi>]`` (the question before the image)."""

    def _user(self, text_ids, image_codes):
        segment = super()._user([], image_codes)  # <user> [<boi> img <eoi>], unlabelled
        ids = [segment.ids[0], *text_ids, *segment.ids[1:]]
        return segment._replace(ids=ids, labels=[IGNORE_INDEX] * len(ids))


def prompt_image_loss(token_losses, batch, vocab, image_weight: float, prompt_image_weight: float):
    """Weighted token mean with understanding tasks' image targets at ``prompt_image_weight``."""
    losses, mask = token_losses
    targets = batch.labels[:, 1:]
    is_image = mask & (targets >= vocab.image_start)
    understanding = torch.tensor([TASKS[i] in ("vqa", "chat", "caption") for i in batch.task_index])[:, None]
    weights = torch.where(is_image, torch.where(understanding, prompt_image_weight, image_weight), 1.0) * mask
    return (losses * weights).sum() / weights.sum().clamp(min=1e-12)


def use_qa_rounds(rounds: int) -> None:
    """Replace the stream's QA reader with ``rounds`` rounds of ShapesWorld questions per image."""
    from unified_mm.data import mixture
    from unified_mm.data.shapesworld import ShapesWorldConfig, describe, scene_from_meta

    config = ShapesWorldConfig()

    def qa_pairs(meta: dict) -> list[tuple[str, str]]:
        rng = random.Random(f"qa-rounds/{meta['key']}")
        scene, pairs = scene_from_meta(meta), {}
        for _ in range(rounds):
            for item in describe(scene, rng, config)[1]:
                pairs.setdefault(item["question"], item["answer"])
        return list(pairs.items())

    mixture._qa_pairs = qa_pairs


def use_yesno_scaffold(fraction: float) -> None:
    """A ``fraction`` of ShapesWorld chats open with "What colour is the object <place>?" and
    then "Is the object <place> <colour>?" about the same object (yes for half of them), followed
    by the sample's other questions as usual."""
    from unified_mm.data import mixture
    from unified_mm.data.shapesworld import DEFAULT_COLOURS, LOCATION_PHRASES

    build = mixture.build_sequence

    def scaffolded(task, image_codes, meta, rng, cfg, builder):
        if task != "chat" or not meta.get("objects") or rng.random() >= fraction:
            return build(task, image_codes, meta, rng, cfg, builder)
        obj = rng.choice(meta["objects"])
        place = LOCATION_PHRASES[obj["position"]]
        asked = obj["colour"] if rng.random() < 0.5 else rng.choice(sorted(set(DEFAULT_COLOURS) - {obj["colour"]}))
        pairs = [(f"What colour is the object {place}?", obj["colour"]),
                 (f"Is the object {place} {asked}?", "yes" if asked == obj["colour"] else "no")]
        others = [p for p in mixture._qa_pairs(meta) if p[0] not in {q for q, _ in pairs}]
        pairs += rng.sample(others, min(cfg.chat_turns - 2, len(others)))
        return builder.chat(mixture.qa_turns(pairs, image_codes), task="chat")

    mixture.build_sequence = scaffolded


def chat_with_fresh_questions(meta: dict, image_codes, rng: random.Random, builder, chat_turns: int, draw,
                              total: int, tries: int):
    """A chat of ``chat_turns`` of the sample's stored questions plus fresh ones from ``draw(rng)``
    (a ``(question, answer)`` or None) until it holds ``total`` distinct questions or ``tries``
    draws are spent (a scene has few distinct questions), in a random order."""
    from unified_mm.data import mixture

    stored = mixture._qa_pairs(meta)
    pairs = rng.sample(stored, min(chat_turns, len(stored)))
    asked = {q for q, _ in pairs}
    for _ in range(tries):
        if len(pairs) >= total:
            break
        item = draw(rng)
        if item is not None and item[0] not in asked:
            asked.add(item[0])
            pairs.append(item)
    rng.shuffle(pairs)
    return builder.chat(mixture.qa_turns(pairs, image_codes), task="chat")


def use_lookup_questions(count: int) -> None:
    """Chats about ShapesWorld images with several objects get ``count`` more questions, drawn
    fresh from the scene with the sequence's own random generator: colour, shape and position
    questions about one object named among several (the lookup the model fails), mixed in with
    the sample's stored questions in a random order."""
    from unified_mm.data import mixture
    from unified_mm.data.shapesworld import ShapesWorldConfig, _colour_qa, _position_qa, _shape_qa, scene_from_meta

    build, config = mixture.build_sequence, ShapesWorldConfig()
    lookups = (_colour_qa, _shape_qa, _position_qa)

    def with_lookups(task, image_codes, meta, rng, cfg, builder):
        if task != "chat" or len(meta.get("objects", [])) < 2 or mixture._conversation(meta) is not None:
            return build(task, image_codes, meta, rng, cfg, builder)
        scene = scene_from_meta(meta)

        def draw(rng):
            item = rng.choice(lookups)(rng, scene, config)
            return None if item is None else (item["question"], item["answer"])

        return chat_with_fresh_questions(meta, image_codes, rng, builder, cfg.chat_turns, draw,
                                         total=cfg.chat_turns + count, tries=4 * count)

    mixture.build_sequence = with_lookups


def place_question(rng: random.Random, meta: dict) -> tuple[str, str]:
    """"What is <place>?" about a cell picked occupied or empty by a coin flip (as ShapesWorld's
    yes/no questions are), answered "nothing" or "a <colour> <shape>"."""
    from unified_mm.data.shapesworld import GRID, LOCATION_PHRASES, POSITION_NAMES

    occupant = {tuple(o["cell"]): o for o in meta["objects"]}
    empty = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in occupant]
    cells = sorted(occupant) if rng.random() < 0.5 or not empty else empty
    cell = rng.choice(cells)
    obj = occupant.get(cell)
    answer = f"a {obj['colour']} {obj['shape']}" if obj else "nothing"
    return f"What is {LOCATION_PHRASES[POSITION_NAMES[cell[0]][cell[1]]]}?", answer


def use_place_questions(count: int) -> None:
    """ShapesWorld chats get up to ``count`` more "What is <place>?" questions (distinct places,
    drawn with the sequence's random generator, mixed in with the stored ones). Why: no stored
    question asks about an empty cell, and yes/no answers are balanced, so "Is there an object in
    the top left?" has no signal until the model reads a cell by its place; here "nothing" or the
    object's words are a direct target for that read-out."""
    from unified_mm.data import mixture

    build = mixture.build_sequence

    def with_places(task, image_codes, meta, rng, cfg, builder):
        if task != "chat" or not meta.get("objects") or mixture._conversation(meta) is not None:
            return build(task, image_codes, meta, rng, cfg, builder)
        kept = min(cfg.chat_turns, len(mixture._qa_pairs(meta)))
        return chat_with_fresh_questions(meta, image_codes, rng, builder, cfg.chat_turns,
                                         lambda rng: place_question(rng, meta), total=kept + count,
                                         tries=4 * count)  # nine places: stop after 4x tries

    mixture.build_sequence = with_places


def use_single_object_start(stream: MixedTaskStream, steps: int, current_step: list) -> None:
    """Until ``current_step[0]`` passes ``steps``, the stream passes over images with more than one
    object (about 2 in 3 on ShapesWorld: cheap, data is ~14 ms of a ~450 ms step)."""
    draw = stream._draw_sample

    def one_object_draw(source_index: int, task: str) -> tuple:
        while True:
            sample = draw(source_index, task)
            if current_step[0] > steps or len(sample[2].get("objects", [])) == 1:
                return sample

    stream._draw_sample = one_object_draw


def use_qa_types(types: tuple, prefix: str = "") -> None:
    """Replace the stream's QA reader with one that keeps only questions of ``types`` (and, with
    ``prefix``, only those starting with it)."""
    from unified_mm.data import mixture

    read_pairs = mixture._qa_pairs

    def qa_pairs(meta: dict) -> list[tuple[str, str]]:
        kept = [qa for qa in meta.get("qa", []) if isinstance(qa, dict) and qa.get("type") in types
                and str(qa.get("question", "")).startswith(prefix)]
        return read_pairs({**meta, "qa": kept})

    mixture._qa_pairs = qa_pairs


def vqa_accuracy(model, builder: SequenceBuilder, codes: str, tok_hash: str, device, n: int = 500) -> dict:
    """Teacher-forced exact match (== greedy exact match) on the val split: overall, per question
    type, per yes/no template ("yesno_<template>") and for questions naming one object, by
    objects in the image ("named_1obj" / "named_multi"; colour and shape questions about one of
    several also by how they name it: "named_multi_place" / "named_multi_attribute", and the same
    per type, e.g. "colour_multi_place")."""
    rows = []  # (sequence, the groups its hit counts towards)
    for index, (_, image_codes, meta) in enumerate(read_precomputed(codes, "val", tok_hash, split_by_rank=False)):
        pair = random.Random(f"vqa/0/{index}").choice(meta["qa"])
        groups = [pair["type"]]
        if pair["type"] == "yesno":
            groups.append(f"yesno_{yesno_template(pair['question'])}")
        if binding := binding_group(pair["type"], meta):
            groups += [f"named_{binding}", f"{pair['type']}_{binding}"]
            if binding == "multi" and pair["type"] != "position":  # named by place, or by attributes
                how = "place" if "the object " in pair["question"] else "attribute"
                groups += [f"named_multi_{how}", f"{pair['type']}_multi_{how}"]
        rows.append((builder.understanding(image_codes, pair["question"], str(pair["answer"])), groups))
        if len(rows) == n:
            break
    hits: dict[str, list[int]] = {}
    every: list[int] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 100):
            chunk = rows[start: start + 100]
            batch = collate([seq for seq, _ in chunk], builder.text_tokenizer.pad_id)
            logits = model(input_ids=batch.ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
            pred = logits[:, :-1, : builder.vocab.image_start].argmax(-1).cpu()  # (B, T-1)
            target = batch.labels[:, 1:]
            for row, (_, groups) in enumerate(chunk):
                mask = target[row] != IGNORE_INDEX
                hit = int(torch.equal(pred[row][mask], target[row][mask]))
                every.append(hit)
                for group in groups:
                    hits.setdefault(group, []).append(hit)
    model.train()
    return {"vqa_acc": sum(every) / len(every), **{f"vqa_{k}": sum(v) / len(v) for k, v in sorted(hits.items())}}


def binding_group(kind: str, meta: dict) -> str | None:
    """For colour / shape / position questions, which name one object: "1obj" when the image has
    one object (nothing to pick), "multi" when it has several (the model must find the one named);
    None for other types."""
    if kind not in ("colour", "shape", "position"):
        return None
    return "1obj" if len(meta.get("objects", [])) == 1 else "multi"


def yesno_template(question: str) -> str:
    """Which of ShapesWorld's three yes/no templates (unified_mm/data/shapesworld.py) asked it."""
    if question.startswith("Is there an object"):
        return "cell"  # "Is there an object in the top left?"
    if question.startswith("Is the object"):
        return "object_colour"  # "Is the object on the left red?"
    return "colour_shape"  # "Is there a red circle?"


def run_variant(name: str, args) -> dict:
    variant = VARIANTS[name]
    preset, lr, mix = variant.preset, variant.lr, variant.mixture
    steps = args.steps or variant.steps
    batch_size = variant.batch or args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if variant.qa_rounds:
        use_qa_rounds(variant.qa_rounds)
    if variant.question_prefix and not variant.qa_types:
        raise SystemExit(f"{name}: question_prefix filters the questions of qa_types; set qa_types too")
    if variant.qa_types:
        use_qa_types(variant.qa_types, variant.question_prefix)
    if variant.yesno_scaffold:
        use_yesno_scaffold(variant.yesno_scaffold)
    if variant.lookup_questions:
        use_lookup_questions(variant.lookup_questions)
    if variant.place_questions:
        use_place_questions(variant.place_questions)
    text = TextTokenizer(Path(args.tokenizer) / "text_tokenizer.model")
    manifest = read_manifest(args.codes)
    # one_group: all of a patch's bits as one image id (the vocabulary regroups the stored codes)
    vocab = Vocab.for_tokenizers(text.vocab_size, manifest["num_bits"], manifest["group_size"], manifest["grid_size"],
                                 image_group_size=manifest["num_bits"] if variant.one_group else 0)
    if variant.text_first and variant.prompt_image_weight > 0:
        raise SystemExit(f"{name}: text_first and prompt_image_weight do not combine (bench builders)")
    builder = (TextFirstBuilder if variant.text_first else SequenceBuilder)(text, vocab, variant.max_length)
    if variant.prompt_image_weight > 0 and variant.question_labels:
        raise SystemExit(f"{name}: prompt_image_weight and question_labels do not combine (bench builders)")
    if variant.prompt_image_weight > 0:  # training sequences only: evaluation keeps the plain builder
        train_builder = PromptImageBuilder(text, vocab, variant.max_length)
    elif variant.question_labels:
        train_builder = QuestionLabelBuilder(text, vocab, variant.max_length)
    else:
        train_builder = builder
    tok_hash = tokenizer_hash(args.tokenizer)
    stream = MixedTaskStream([SourceConfig(codes=args.codes)], MixtureConfig(start=mix, chat_turns=variant.chat_turns), train_builder,
                             tokenizer_hash=tok_hash, total_steps=steps, seed=args.seed, rank=0, shuffle_buffer=2000)
    current_step = [0]
    if variant.single_object_steps:
        use_single_object_start(stream, variant.single_object_steps, current_step)
    torch.manual_seed(args.seed)
    model_cfg = UnifiedModelConfig(preset=preset, image_embedding_init="bits" if variant.bit_init else "default",
                                   image_embedding_random=variant.bit_random,
                                   image_positions=variant.pos2d, overrides=dict(variant.overrides),
                                   attention_init_scale=variant.qk_init_scale or 1.0)
    model = build_model(model_cfg, vocab).to(device)
    # as the trainer (train/optim.py): matrices decay, norms and other 1-D weights do not (runs
    # before 2026-11-29 decayed every weight)
    optimizer = build_optimizer(model, OptimConfig(lr=lr, weight_decay=variant.weight_decay, betas=(0.9, 0.95),
                                                   name="muon" if variant.muon else "adamw",
                                                   muon_params=("model.layers.*",) if variant.muon else ()))
    # rows from session 21 on record it: before, torch's Muon always iterated in bf16
    muon_ns = (str(optimizer._muon.ns_dtype_for(next(iter(optimizer._muon.param_groups[0]["params"]))))
               if variant.muon else None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(50, steps, 0.1))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.cpu_bf16))
    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        current_step[0] = step
        batch = stream.next_batch(batch_size, step, text.pad_id)
        with autocast:
            if variant.hidden_loss:
                hidden = model.model(input_ids=batch.ids.to(device),
                                     attention_mask=batch.attention_mask.to(device)).last_hidden_state
                token_losses = modality_token_losses_from_hidden(hidden, model.lm_head, batch.labels.to(device), vocab)
            else:
                logits = model(input_ids=batch.ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        if not variant.hidden_loss:
            token_losses = modality_token_losses(logits, batch.labels.to(device), vocab)
        if variant.prompt_image_weight > 0:
            loss = prompt_image_loss(token_losses, batch, vocab, variant.image_weight, variant.prompt_image_weight)
        else:
            loss = weighted_mean_loss(token_losses, batch.labels, vocab, variant.image_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % args.eval_every == 0 or step == steps:
            point = {"step": step, "loss": float(loss.detach()), "seconds": round(time.perf_counter() - start, 1),
                     **vqa_accuracy(model, builder, args.codes, tok_hash, device, 300)}
            curve.append(point)
            # written as it happens: a run cut short by a time limit keeps its curve so far
            with open(Path(args.out) / "budget_curve.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"variant": name, **point}) + "\n")
            eta = point["seconds"] / step * (steps - step)  # stdout is the parent's result channel
            print(f"{name}: step {step}/{steps}, {point['seconds'] / step:.2f} s/step, VQA {point['vqa_acc']:.1%}, "
                  f"ETA {eta / 60:.0f} min", file=sys.stderr, flush=True)
    final = vqa_accuracy(model, builder, args.codes, tok_hash, device, 1000)
    # what a loss weighting costs the other tasks: held-out per-task losses on val (64 each)
    held = eval_sequences(SourceConfig(codes=args.codes, split="val"), MixtureConfig(start=mix, chat_turns=variant.chat_turns),
                          builder, tokenizer_hash=tok_hash, per_task=64)
    losses = heldout_losses(model, vocab, held, pad_id=text.pad_id)
    final.update({f"heldout_{task}": round(value, 4) for task, value in losses.items()})
    gain = text_gain(losses, held)
    final["t2i_text_gain_per_image"] = None if gain is None else round(gain, 3)
    return {"variant": name, "seed": args.seed, "preset": preset, "steps": steps, "lr": lr, "mixture": mix,
            "batch": batch_size, "chat_turns": variant.chat_turns, "bit_init": variant.bit_init,
            "image_weight": variant.image_weight,
            "pos2d": variant.pos2d, "cpu_bf16": variant.cpu_bf16, "one_group": variant.one_group,
            "overrides": variant.overrides, "prompt_image_weight": variant.prompt_image_weight,
            "qa_rounds": variant.qa_rounds, "hidden_loss": variant.hidden_loss, "qa_types": list(variant.qa_types),
            "text_first": variant.text_first, "single_object_steps": variant.single_object_steps,
            "muon": variant.muon, "question_labels": variant.question_labels,
            "yesno_scaffold": variant.yesno_scaffold, "bit_random": variant.bit_random, "weight_decay": variant.weight_decay,
            "qk_init_scale": variant.qk_init_scale, "question_prefix": variant.question_prefix,
            "lookup_questions": variant.lookup_questions, "place_questions": variant.place_questions,
            "muon_ns_dtype": muon_ns,
            "seconds": round(time.perf_counter() - start, 1), **final, "curve": curve}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codes", required=True, help="precomputed codes directory (train + val)")
    parser.add_argument("--tokenizer", required=True, help="the QLIP export the codes were made with")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step (the demo: 2 ranks x 16)")
    parser.add_argument("--steps", type=int, default=0, help="override every variant's steps (smoke runs)")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch's default)")
    parser.add_argument("--jobs", type=int, default=1, help="variants run at once (subprocesses)")
    parser.add_argument("--out", default="runs/unified_budget")
    parser.add_argument("--seed", type=int, default=0,
                        help="data order and initial weights (default 0, as in every row before session 15)")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args)), flush=True)
        return 0
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    passthrough = ["--codes", args.codes, "--tokenizer", args.tokenizer, "--device", args.device, "--out", args.out, "--batch",
                   str(args.batch), "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                   "--threads", str(args.threads), "--seed", str(args.seed)]
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            command = [sys.executable, __file__, *passthrough, "--worker", name]
            running.append((name, subprocess.Popen(command, stdout=subprocess.PIPE, text=True)))
        for name, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((name, proc))
            lines = [line for line in proc.stdout.read().splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"variant": name, "error": proc.returncode}
            with open(out / "budget.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            summary = {k: v for k, v in row.items() if k not in ("curve", "mixture")}
            print(json.dumps(summary), flush=True)
        time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
