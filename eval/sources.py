"""Questions for the answer-generating tasks (VQA, captioning), from ShapesWorld or a real format.

Every source yields :class:`Question` s: the user turn's text, the image it is asked about (a
ShapesWorld key or an image path; see :meth:`eval.context.Context.image_codes`), the references it
is scored against and the groups it is broken down by. Question ids are stable across runs (they
key the resumable answer files): ``{sample key}/{qa index}`` on ShapesWorld, the file's ids for
real formats.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Hashable, NamedTuple, Sequence

from mmcore.errors import UserError
from unified_mm.data.mixture import CAPTION_PROMPTS

from eval.context import SWSample
from eval.formats import (read_coco_captions, read_llava_json, read_llava_questions, read_vqav2,
                          resolve_image_path)

CAPTION_PROMPT = CAPTION_PROMPTS[0]      # "Describe the image.", as in training
REFERENCE_COPIES = 10                    # a single ground-truth answer counts as 10 annotators
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LLAVA_IMAGE_TOKEN = "<image>"


class Question(NamedTuple):
    qid: int | str
    text: str                       # the user turn (question or caption prompt)
    image: Hashable | None          # ShapesWorld key, image Path, or None (text only)
    references: list[str]           # answers (VQA: 10 "annotators") or captions; [] = unscored
    label: str | None               # the single reference of exact-match accuracy
    groups: dict                    # breakdowns, e.g. {"type": "colour"}
    metadata: dict                  # written into the answer record


def _per_image(value: str) -> int | None:
    if value == "all":
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise UserError(f"--vqa-per-image must be 'all' or a positive integer, got {value!r}")


def shapesworld_vqa(samples: Sequence[SWSample], per_image: str, seed: int) -> list[Question]:
    """All QA pairs of every sample, or ``per_image`` of them chosen by a seeded RNG per sample."""
    count = _per_image(per_image)
    questions = []
    for sample in samples:
        pairs = [(i, p) for i, p in enumerate(sample.meta.get("qa") or [])
                 if isinstance(p, dict) and p.get("question") and p.get("answer") is not None]
        if count is not None and len(pairs) > count:
            pairs = sorted(random.Random(f"vqa/{seed}/{sample.key}").sample(pairs, count), key=lambda x: x[0])
        # by object count too: with several objects the model must find the one a question names
        objects = sample.meta.get("objects")
        by_objects = {"objects": str(len(objects))} if isinstance(objects, list) else {}
        for index, pair in pairs:
            answer, kind = str(pair["answer"]), str(pair.get("type", "all"))
            questions.append(Question(f"{sample.key}/{index}", str(pair["question"]), sample.key,
                                      [answer] * REFERENCE_COPIES, answer, {"type": kind, **by_objects},
                                      {"image": sample.key, "type": kind, "answer": answer}))
    if not questions:
        raise UserError("no ShapesWorld questions in the selected samples (metadata has no 'qa')")
    return questions


def shapesworld_captions(samples: Sequence[SWSample]) -> list[Question]:
    return [Question(s.key, CAPTION_PROMPT, s.key, [c for c in s.meta.get("captions", []) if isinstance(c, str)],
                     None, {}, {"image": s.key}) for s in samples]


def _find_image(images: Path, file_name: str | None, image_id, where: str) -> Path:
    """The image of a VQAv2 question: its COCO file name, else ``{image_id}`` with a usual suffix."""
    tried = [file_name] if file_name else []
    tried += [f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]
    if isinstance(image_id, int):
        tried += [f"{image_id:012d}{suffix}" for suffix in IMAGE_SUFFIXES]
    for name in tried:
        path = resolve_image_path(images, name, where, check_exists=False)
        if path.is_file():
            return path
    raise UserError(f"{where}: image not found in {images} (tried {', '.join(tried[:3])}, ...)")


def vqav2(questions_path: str, annotations_path: str | None, images: Path, limit: int | None) -> list[Question]:
    """VQAv2 questions (the first ``limit``) scored against their 10 annotator answers."""
    out = []
    for q in read_vqav2(questions_path, annotations_path)[:limit]:
        path = _find_image(images, q.image_file, q.image_id, f"{questions_path}: question {q.question_id}")
        label = q.multiple_choice_answer or (max(set(q.answers), key=q.answers.count) if q.answers else None)
        groups = {k: v for k, v in (("answer_type", q.answer_type), ("question_type", q.question_type)) if v}
        out.append(Question(q.question_id, q.question, path, list(q.answers or []), label, groups,
                            {"image_id": q.image_id, **groups}))
    return out


def _llava_text(text: str) -> str:
    return " ".join(text.replace(LLAVA_IMAGE_TOKEN, " ").split())


def llava(path: str, images: Path, limit: int | None) -> list[Question]:
    """LLaVA data: a JSON list of conversations (first human turn asked, first gpt turn is the
    reference) or an evaluation JSONL (``text`` asked; scored when it has an ``answer`` field).
    One image per question: the first one listed."""
    out = []
    if str(path).endswith(".jsonl"):
        for q in read_llava_questions(path, images)[:limit]:
            answer = q.extra.get("answer")
            answer = str(answer) if isinstance(answer, (str, int, float)) else None
            groups = {"category": str(q.extra["category"])} if "category" in q.extra else {}
            out.append(Question(q.question_id, _llava_text(q.text), q.images[0] if q.images else None,
                                [answer] * REFERENCE_COPIES if answer else [], answer, groups, dict(groups)))
        return out
    for sample in read_llava_json(path, images)[:limit]:
        human = next((t for s, t in sample.conversations if s == "human"), None)
        gpt = next((t for s, t in sample.conversations if s == "gpt"), None)
        if human is None:
            raise UserError(f"{path}: sample {sample.id!r} has no human turn")
        out.append(Question(sample.id, _llava_text(human), sample.images[0] if sample.images else None,
                            [gpt] * REFERENCE_COPIES if gpt else [], gpt, {}, {}))
    return out


def coco_captions(path: str, images: Path, limit: int | None) -> list[Question]:
    """COCO caption images that have references (the first ``limit``), with all their captions."""
    out = []
    for image in [i for i in read_coco_captions(path) if i.captions][:limit]:
        file = resolve_image_path(images, image.file_name, f"{path}: image {image.image_id}")
        out.append(Question(image.image_id, CAPTION_PROMPT, file, list(image.captions), None, {},
                            {"file_name": image.file_name}))
    if not out:
        raise UserError(f"{path}: no image has reference captions")
    return out
