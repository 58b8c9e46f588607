"""The evaluators. Each takes the run's :class:`eval.context.Context` and returns a dict:
``scores`` (what results.json records), ``table`` (its rows of the report's score table),
``info`` (counts, sources, files), ``tables`` / ``figures`` (detail for the report).

Answer-generating tasks (VQA, captioning) write LLaVA answer files (``answers/{task}.jsonl``) with
:class:`eval.answer_file.AnswerWriter` and score what the file holds. Questions are answered in fixed
chunks of ``--batch-size`` (slices of the full question list): a resumed run skips every finished
chunk and recomputes a partly finished one whole, writing only its missing answers, so each
answer is computed in exactly the batch (same padding, same arithmetic) it would have been in
without the interruption and the answer file and scores come out identical.
"""
from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations, islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmcore.errors import UserError
from mmcore.io import atomic_output_path, atomic_write_text
from tokenizer.images import decode_to_pixels, encode_images, image_to_pixels, pixels_to_uint8
from unified_mm.data.analyser import analyse, scene_matches
from unified_mm.generate import greedy_text
from unified_mm.quick_eval import caption_gain
from unified_mm.sampling import SamplerSettings, sample_images
from unified_mm.sequence import Turn
from unified_mm.tokenizer_eval import DEFAULT_TEMPLATES, evaluate_tokenizer

from eval import sources
from eval.answer_file import AnswerWriter, read_answer_file
from eval.context import Context
from eval.formats import read_geneval_jsonl
from eval.metrics.caption import caption_scores
from eval.metrics.geneval import (evaluate_images, prompts_from_metas, reference_accuracy, reference_render,
                                  requirements_for)
from eval.metrics.image import fid, load_feature_network, psnr, ssim
from eval.metrics.vqa import exact_match, normalize_answer, vqa_scores, yes_no_scores
from eval.report import save_grid

EXAMPLES = 8


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# Answers (VQA, captioning)
# ---------------------------------------------------------------------------------------------

def answer_questions(ctx: Context, task: str, questions: list[sources.Question]) -> tuple[dict, dict]:
    """Greedy answers to every question (resuming ``answers/{task}.jsonl``); returns
    ({question id: answer text}, answer-file statistics)."""
    seen = set()
    for q in questions:
        if q.qid in seen:
            raise UserError(f"{task}: question id {q.qid!r} appears twice in the input")
        seen.add(q.qid)
    loaded, builder, args = ctx.unified, ctx.builder, ctx.args
    text = loaded.text_tokenizer
    max_new = args.max_new_tokens or int(loaded.sampler_defaults["max_new_tokens"])
    path = ctx.out / "answers" / f"{task}.jsonl"
    with AnswerWriter(path, ctx.model_id) as writer:
        resumed = sum(writer.is_done(q.qid) for q in questions)
        generated = 0
        with tqdm(total=len(questions), initial=resumed, desc=f"{task} answers", unit="q",
                  disable=not ctx.progress) as bar:
            for start in range(0, len(questions), args.batch_size):
                chunk = questions[start:start + args.batch_size]
                if all(writer.is_done(q.qid) for q in chunk):
                    continue
                codes = ctx.image_codes([q.image for q in chunk])
                prompts = [builder.chat_prompt([Turn("user", q.text, c)]) for q, c in zip(chunk, codes)]
                room = builder.max_length - max(len(p) for p in prompts)
                if room < 1:
                    q = chunk[max(range(len(chunk)), key=lambda i: len(prompts[i]))]
                    raise UserError(f"{task}: question {q.qid!r} does not fit the model's context "
                                    f"({builder.max_length} tokens) with its image")
                outputs = greedy_text(loaded.model, loaded.vocab, prompts, pad_id=text.pad_id, eos_id=text.eos_id,
                                      max_new_tokens=min(max_new, room))
                for q, ids in zip(chunk, outputs):
                    if not writer.is_done(q.qid):
                        writer.write(q.qid, q.text, text.decode(ids), metadata=q.metadata)
                        generated += 1
                        bar.update(1)
    records = {r["question_id"]: r for r in read_answer_file(path)}
    answers = {}
    for q in questions:
        if records[q.qid]["prompt"] != q.text:
            raise UserError(f"{path}: question {q.qid!r} was asked as {records[q.qid]['prompt']!r}, this run "
                            f"asks {q.text!r}; use another --out")
        answers[q.qid] = records[q.qid]["text"]
    stats = {"file": str(path.relative_to(ctx.out)), "questions": len(questions), "resumed": resumed,
             "generated": generated}
    return answers, stats


def score_vqa(questions: list[sources.Question], answers: dict, normalise_references: bool) -> dict:
    """Soft accuracy, exact match, per-group breakdowns and yes/no metrics of scored questions."""
    scored = [q for q in questions if q.references]
    scores: dict = {"questions": len(questions), "scored": len(scored)}
    if not scored:
        return scores
    soft = vqa_scores({q.qid: answers[q.qid] for q in scored}, {q.qid: q.references for q in scored},
                      normalise_references=normalise_references).per_question
    exact = {q.qid: exact_match(answers[q.qid], q.label) for q in scored if q.label is not None}
    scores.update(soft_accuracy=_mean(soft.values()), exact_match=_mean(exact.values()))
    groups = sorted({g for q in scored for g in q.groups})
    # each group alone, then every pair crossed ("objects_x_type": "1 / yesno"): a failure confined
    # to one cell (ShapesWorld: yes/no on one-object images) is averaged away in the margins
    for names in [(g,) for g in groups] + list(combinations(groups, 2)):
        buckets = defaultdict(list)
        for q in scored:
            if all(g in q.groups for g in names):
                buckets[" / ".join(str(q.groups[g]) for g in names)].append(q.qid)
        scores["per_" + "_x_".join(names)] = {
            value: {"n": len(ids), "soft_accuracy": _mean(soft[i] for i in ids),
                    "exact_match": _mean(exact[i] for i in ids if i in exact)}
            for value, ids in sorted(buckets.items())}
    yes_no = [q for q in scored if q.label is not None and normalize_answer(q.label) in ("yes", "no")]
    if yes_no:
        result = yes_no_scores([answers[q.qid] for q in yes_no], [normalize_answer(q.label) for q in yes_no])
        scores["yes_no"] = {**result._asdict(), "n": len(yes_no)}
    return scores


def _examples(questions, answers, reference) -> list[list[str]]:
    return [[q.text, answers[q.qid], reference(q)] for q in questions[:EXAMPLES]]


def vqa(ctx: Context) -> dict:
    args = ctx.args
    if args.vqav2_questions:
        questions, source, raw_refs = sources.vqav2(args.vqav2_questions, args.vqav2_annotations, Path(args.images),
                                                    ctx.limit("vqa")), "VQAv2", False
    elif args.llava:
        questions, source, raw_refs = sources.llava(args.llava, Path(args.images), ctx.limit("vqa")), "LLaVA", True
    else:
        questions = sources.shapesworld_vqa(ctx.shapesworld_for("vqa"), args.vqa_per_image, args.seed)
        source, raw_refs = f"ShapesWorld {args.split}", True
    answers, stats = answer_questions(ctx, "vqa", questions)
    scores = score_vqa(questions, answers, normalise_references=raw_refs)
    table = [["soft accuracy (VQAv2)", scores.get("soft_accuracy"), "%"],
             ["exact match", scores.get("exact_match"), "%"]]
    if "yes_no" in scores:
        table += [[f"yes/no {k}", scores["yes_no"][k], "%"] for k in ("accuracy", "f1")]
    tables = [{"title": f"accuracy by {name[4:].replace('_', ' ')}", "header": ["group", "n", "soft", "exact"],
               "rows": [[k, v["n"], f"{100 * v['soft_accuracy']:.1f}%",
                         "n/a" if v["exact_match"] is None else f"{100 * v['exact_match']:.1f}%"]
                        for k, v in scores[name].items()]} for name in scores if name.startswith("per_")]
    if "yes_no" in scores:
        yn = scores["yes_no"]
        tables.append({"title": "yes/no questions (POPE style, 'yes' positive)",
                       "header": ["n", "accuracy", "precision", "recall", "F1", "yes ratio"],
                       "rows": [[yn["n"]] + [f"{100 * yn[k]:.1f}%" for k in
                                             ("accuracy", "precision", "recall", "f1", "yes_ratio")]]})
    tables.append({"title": "examples", "header": ["question", "answer", "truth"],
                   "rows": _examples(questions, answers, lambda q: q.label or "")})
    return {"scores": scores, "table": table, "info": {"source": source, "answers": stats}, "tables": tables}


def caption(ctx: Context) -> dict:
    args = ctx.args
    if args.coco_captions:
        questions, source = sources.coco_captions(args.coco_captions, Path(args.images), ctx.limit("caption")), "COCO"
    else:
        questions, source = sources.shapesworld_captions(ctx.shapesworld_for("caption")), f"ShapesWorld {args.split}"
    answers, stats = answer_questions(ctx, "caption", questions)
    scored = [q for q in questions if q.references]
    scores = caption_scores({q.qid: answers[q.qid] for q in scored}, {q.qid: q.references for q in scored})
    scores.update(images=len(scored), references=sum(len(q.references) for q in scored))
    table = [["CIDEr-D", scores["cider_d"], ""], ["BLEU-4", scores["bleu_4"], ""]]
    tables = [{"title": "examples", "header": ["prompt", "caption", "first reference"],
               "rows": _examples(questions, answers, lambda q: q.references[0] if q.references else "")}]
    return {"scores": scores, "table": table, "info": {"source": source, "prompt": sources.CAPTION_PROMPT,
                                                       "answers": stats}, "tables": tables}


# ---------------------------------------------------------------------------------------------
# Tokenizer tasks
# ---------------------------------------------------------------------------------------------

def zero_shot(ctx: Context) -> dict:
    args = ctx.args
    tok, which = ctx.zero_shot_tokenizer()
    if tok.model.text is None or tok.text_tokenizer is None:
        raise UserError(f"zero_shot needs a tokenizer with a text tower; the tokenizer {which} has none "
                        f"(a stage-2 export): pass --tokenizer with a stage-1 export")
    templates = args.zero_shot_template or list(DEFAULT_TEMPLATES)
    metrics = evaluate_tokenizer(tok.model, tok.text_tokenizer, args.data, args.split,
                                 max_images=ctx.limit("zero_shot"), batch_size=args.batch_size,
                                 progress=ctx.progress, templates=templates)
    scores = {"accuracy": metrics.get("zero_shot_acc"), "images": metrics.get("zero_shot_images", 0),
              "classes": metrics.get("zero_shot_classes"), "templates": templates,
              "colour_accuracy": metrics.get("zero_shot_colour_acc"),
              "shape_accuracy": metrics.get("zero_shot_shape_acc"),
              "code_entropy_fraction": metrics["code_entropy_fraction"]}
    table = [["accuracy (colour+shape, single-object images)", scores["accuracy"], "%"],
             ["colour right", scores["colour_accuracy"], "%"], ["shape right", scores["shape_accuracy"], "%"],
             ["images", scores["images"], ""]]
    return {"scores": scores, "table": table, "info": {"tokenizer": which, "tokenizer_hash": tok.hash}}


def _shapesworld_images(ctx: Context, task: str):
    from unified_mm.data.shards import ShardDataset, resolve_shards

    return list(islice(ShardDataset(resolve_shards(ctx.args.data, ctx.args.split), split_by_rank=False),
                       ctx.limit(task)))


def reconstruction(ctx: Context) -> dict:
    args = ctx.args
    tok, which = ctx.recon_tokenizer()
    samples, world = _shapesworld_images(ctx, "reconstruction"), ctx.world
    size = tok.model.config.encoder.image_size
    if samples and samples[0].image.size != (size, size):
        raise UserError(f"{samples[0].shard}: images are {samples[0].image.size[0]}x{samples[0].image.size[1]}, "
                        f"the tokenizer takes {size}x{size}")
    originals, recons, judged, judged_original = [], [], [], []
    for start in tqdm(range(0, len(samples), args.batch_size), desc="reconstruction", unit="batch",
                      disable=not ctx.progress):
        chunk = samples[start:start + args.batch_size]
        pixels = torch.stack([image_to_pixels(s.image) for s in chunk])
        _, groups = encode_images(tok.model, pixels, args.batch_size)
        for sample, before, after in zip(chunk, pixels, decode_to_pixels(tok.model, groups, args.batch_size)):
            originals.append(pixels_to_uint8(before))
            recons.append(pixels_to_uint8(after))
            objects = sample.meta.get("objects", [])
            judged.append(scene_matches(analyse(recons[-1], world), objects))
            judged_original.append(scene_matches(analyse(originals[-1], world), objects))
    scores = {"images": len(samples), "psnr_db": _mean(psnr(a, b) for a, b in zip(originals, recons)),
              "ssim": _mean(ssim(a, b) for a, b in zip(originals, recons)),
              "judge_accuracy": _mean(judged), "judge_accuracy_originals": _mean(judged_original)}
    table = [["PSNR", scores["psnr_db"], "dB"], ["SSIM", scores["ssim"], ""],
             ["judge accuracy on reconstructions", scores["judge_accuracy"], "%"]]
    if args.fid_network:
        if len(samples) < 2:
            raise UserError("FID needs at least 2 images; raise --limit")
        scores["fid"] = fid(load_feature_network(args.fid_network), np.stack(originals), np.stack(recons),
                            args.batch_size)
        table.append(["FID (vs originals)", scores["fid"], ""])
    shown = min(len(samples), args.report_rows)
    file = save_grid(ctx.out, "reconstruction.png", [originals[:shown], recons[:shown]],
                     [[None] * shown, judged[:shown]])
    figure = {"title": "originals (top) and reconstructions (bottom)", "file": file,
              "caption": "Frame: green = the pixel analyser finds exactly the original's objects in the "
                         "reconstruction, red = it does not."}
    return {"scores": scores, "table": table, "figures": [figure],
            "info": {"tokenizer": which, "tokenizer_hash": tok.hash}}


# ---------------------------------------------------------------------------------------------
# Text-to-image
# ---------------------------------------------------------------------------------------------

def _sample_codes(ctx: Context, texts: list[str], n: int, settings: SamplerSettings) -> tuple[np.ndarray, bool]:
    """((len(texts)·n, N, G) sampled codes, reused?); with --resume a complete earlier draw with the
    same model, prompts, seeds and settings is reused (``t2i/cfg_{scale}.npz``)."""
    loaded = ctx.unified
    meta = json.dumps({"model": loaded.hash, "prompts": texts, "n": n, "settings": settings.to_dict()},
                      sort_keys=True)
    path = ctx.out / "t2i" / f"cfg_{settings.cfg_scale:g}.npz"
    if ctx.args.resume and path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["meta"]) == meta:
                return cached["codes"], True
    total = len(texts) * n * loaded.vocab.tokens_per_image
    with tqdm(total=total, desc=f"t2i cfg {settings.cfg_scale:g}", unit="tok", disable=not ctx.progress) as bar:
        samples = sample_images(loaded.model, loaded.vocab, ctx.builder, texts, n, settings,
                                batch_size=ctx.args.batch_size, progress=bar.update)
    codes = torch.stack([s.image_codes for s in samples]).numpy()
    with atomic_output_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, codes=codes, meta=np.array(meta))
    return codes, False


def _verdict_text(judgement) -> str:
    if judgement.whole:
        return "✓"
    found = [f"{d.colour} {d.shape} ({d.position})" for d in judgement.detected]
    more = f" +{len(found) - 3} more" if len(found) > 3 else ""
    return f"✗ saw {', '.join(found[:3]) or 'nothing'}{more}"


def _per_tag_rows(scores: dict, attributes: tuple[str, ...]) -> list[list]:
    """One row per (prompt tag, judged set): where whole-prompt accuracy is lost, e.g. counts."""
    rows = []
    for tag in sorted({t for s in scores.values() for t in s.get("per_tag_scores", {})}):
        for name, summary in scores.items():
            tagged = summary.get("per_tag_scores", {}).get(tag)
            if tagged:
                rows.append([tag, name, tagged["n"]] +
                            [f"{100 * tagged[a]:.1f}%" if a in tagged else "n/a" for a in attributes])
    return rows


# t2i score key (ShapesWorld prompts only: it needs the true images' codes)
CAPTION_GAIN = "caption_gain"


def text_to_image(ctx: Context) -> dict:
    args, world = ctx.args, ctx.world
    loaded, qlip = ctx.unified, ctx.qlip
    kinds = [k.strip() for k in args.t2i_kinds.split(",") if k.strip()]
    samples = None if args.geneval else ctx.shapesworld_for("t2i")
    prompts = (read_geneval_jsonl(args.geneval)[:ctx.limit("t2i")] if args.geneval
               else prompts_from_metas([s.meta for s in samples], kinds))
    for prompt in prompts:
        requirements_for(prompt, world)  # unjudgeable prompts fail before any sampling
    n = args.t2i_samples
    expanded = [p for p in prompts for _ in range(n)]
    texts = [p.prompt for p in prompts]
    scores, judged, records, table, reused = {}, {}, [], [], []
    for scale in ctx.cfg_scales:
        settings = SamplerSettings.from_defaults(loaded.sampler_defaults, cfg_scale=scale, seed=args.seed,
                                                 temperature=args.temperature, top_k=args.top_k,
                                                 top_p=args.top_p)
        codes, was_reused = _sample_codes(ctx, texts, n, settings)
        reused += [scale] if was_reused else []
        images = [pixels_to_uint8(p) for p in decode_to_pixels(qlip.model, codes)]
        summary, judgements = evaluate_images(images, expanded, world)
        scores[f"cfg_{scale:g}"] = {**summary, "settings": settings.to_dict()}
        judged[scale] = (images, judgements)
        table.append([f"whole-prompt accuracy, cfg {scale:g}", summary["whole"], "%"])
        records += [{"prompt": p.prompt, "tag": p.tag, "key": p.key, "seed": args.seed + i, "cfg_scale": scale,
                     "whole": j.whole, "scores": j.scores, "detected": [d._asdict() for d in j.detected]}
                    for i, (p, j) in enumerate(zip(expanded, judgements))]
    atomic_write_text(ctx.out / "t2i" / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    ceiling = None
    if samples is not None:  # the judge on the tokenizer's reconstructions of the ground truth
        recon = [pixels_to_uint8(p) for p in decode_to_pixels(qlip.model, np.stack([s.codes for s in samples]))]
        scores["ceiling_reconstruction"], ceiling = evaluate_images([r for r in recon for _ in kinds], prompts, world)
        scores["judge_on_ground_truth"] = reference_accuracy([s.meta for s in samples], world, kinds)
        table.append(["ceiling: judge on tokenizer reconstructions", scores["ceiling_reconstruction"]["whole"], "%"])
        # does the model condition on the prompt at all? (teacher forced on the true images' codes)
        gain = caption_gain(loaded.model, ctx.builder, [(p.prompt, samples[i // len(kinds)].codes)
                                                       for i, p in enumerate(prompts)],
                            pad_id=loaded.text_tokenizer.pad_id, batch_size=args.batch_size)
        scores[CAPTION_GAIN] = {"nats_per_image": gain, "prompts": len(prompts)}
        table.append(["caption's gain: image loss without minus with the prompt (nats/image)", gain, "nats"])
    attributes = ("whole", "colour", "shape", "count", "position", "size")
    rows = [[name] + [f"{100 * s[a]:.1f}%" if a in s else "n/a" for a in attributes]
            for name, s in scores.items() if name != CAPTION_GAIN]
    tables = [{"title": "per-attribute accuracy (GenEval style)", "header": ["judged images", *attributes],
               "rows": rows},
              {"title": "by prompt kind (tag; ShapesWorld: caption kind and number of objects)",
               "header": ["tag", "judged images", "n", *attributes],
               "rows": _per_tag_rows(scores, attributes)}]
    shown = list(range(min(len(prompts), args.report_rows)))
    grid, verdicts, verdict_rows = [], [], []
    for i in shown:
        row, frame, words = [], [], [prompts[i].prompt]
        if samples is not None:
            row += [np.asarray(reference_render(samples[i // len(kinds)].meta, world)), recon[i // len(kinds)]]
            frame += [None, ceiling[i].whole]
            words.append(_verdict_text(ceiling[i]))
        for scale in ctx.cfg_scales:
            images, judgements = judged[scale]
            row += images[i * n:(i + 1) * n]
            frame += [j.whole for j in judgements[i * n:(i + 1) * n]]
            words.append("; ".join(_verdict_text(j) for j in judgements[i * n:(i + 1) * n]))
        grid.append(row)
        verdicts.append(frame)
        verdict_rows.append(words)
    columns = (["ground truth", "reconstruction"] if samples is not None else []) + \
        [f"cfg {s:g} ({n} sample{'s' * (n > 1)})" for s in ctx.cfg_scales]
    figure = {"title": "text-to-image samples per prompt", "file": save_grid(ctx.out, "t2i.png", grid, verdicts),
              "caption": "Columns: " + ", ".join(columns) + ". Frame: green = the judge accepts the whole "
                         "prompt, red = it rejects it."}
    tables.append({"title": "judge verdicts (grid rows)", "header": ["prompt"] + (columns[1:] if samples is not None else columns),
                   "rows": verdict_rows})
    seeds = {"first": args.seed, "count": len(expanded), "rule": "image i (prompt-major) uses seed + i at every cfg"}
    return {"scores": scores, "table": table, "tables": tables, "figures": [figure],
            "info": {"prompts": len(prompts), "samples_per_prompt": n, "seeds": seeds, "reused_draws": reused,
                     "source": args.geneval or f"ShapesWorld {args.split} ({', '.join(kinds)} captions)",
                     "samples_file": "t2i/samples.jsonl"}}
