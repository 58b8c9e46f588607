"""Mixed-task training sequences from precomputed image codes, following a mixture schedule.

A *source* is a directory of precomputed codes (``python -m unified_mm.tokenizer_cli precompute``)
and a split; each sample is ``(key, image codes (N, G), meta)``. What a sample can be used for
follows from its meta:

=================  =============================================================================
meta field         tasks
=================  =============================================================================
``qa``             ``vqa`` (one question), ``chat`` (several questions as turns, image first)
``captions``       ``caption`` (describe the image), ``t2i`` (caption → image), ``text`` (text only)
``conversations``  ``chat`` (LLaVA-style turns, from ``unified_mm.data.convert_cli llava``)
=================  =============================================================================

Each sequence first draws its task from the schedule's weights at the current step (linear
from ``start`` to ``end`` over the run, as QLIP's 60:1:3 → 12:1:3), then a source that declares
the task, then that source's next sample; a sample that cannot serve the task is counted and
passed over. All random choices come from ``Random(f"{seed}/{rank}/{sequence index}")``, so the
stream is a pure function of its position: resuming restores the positions (sequences drawn,
samples read per source) and continues with exactly the sequences an uninterrupted run sees.
"""
from __future__ import annotations

import dataclasses
import random
from itertools import islice
from pathlib import Path
from typing import Iterator, Optional

from mmcore.config import ConfigError
from mmcore.errors import UserError
from unified_mm.data.shards import SkipLog
from unified_mm.sequence import IGNORE_INDEX, TASKS, Batch, Sequence, SequenceBuilder, Turn, collate
from unified_mm.tokenizer_cli import read_precomputed

CAPTION_PROMPTS = ("Describe the image.", "What is in this picture?", "Write a caption for this image.")
MAX_DRAWS = 1000  # samples passed over in a row before a task is declared unservable


@dataclasses.dataclass
class SourceConfig:
    codes: str = "runs/codes"  # precomputed codes directory
    split: str = "train"
    tasks: list = dataclasses.field(default_factory=lambda: list(TASKS))  # tasks drawn from here


@dataclasses.dataclass
class MixtureConfig:
    """Task weights at the first and last step (linear in between); ``end`` empty = constant."""

    start: dict = dataclasses.field(default_factory=lambda: {"vqa": 6.0, "caption": 1.0, "chat": 1.0,
                                                             "t2i": 4.0, "text": 0.5})
    end: dict = dataclasses.field(default_factory=dict)
    caption_dropout: float = 0.1  # t2i captions dropped to learn the unconditional (CFG)
    chat_turns: int = 3  # questions per synthetic chat built from a sample's QA pairs
    caption_prompts: list = dataclasses.field(default_factory=lambda: list(CAPTION_PROMPTS))

    def validate(self) -> None:
        for name, weights in (("start", self.start), ("end", self.end)):
            for task, weight in weights.items():
                if task not in TASKS:
                    raise ConfigError(f"mixture.{name}: unknown task {task!r}; known: {', '.join(TASKS)}")
                if not isinstance(weight, (int, float)) or weight < 0:
                    raise ConfigError(f"mixture.{name}.{task}: weight must be a number >= 0, got {weight!r}")
        if not any(w > 0 for w in self.start.values()):
            raise ConfigError("mixture.start: at least one task needs a weight > 0")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"mixture.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.chat_turns < 1 or not self.caption_prompts:
            raise ConfigError("mixture.chat_turns must be >= 1 and caption_prompts non-empty")


def weights_at(cfg: MixtureConfig, step: int, total_steps: int) -> dict[str, float]:
    """Task weights at ``step`` (linear from ``start`` to ``end``, tasks missing count as 0)."""
    if not cfg.end:
        return {task: float(cfg.start.get(task, 0.0)) for task in TASKS}
    t = min(1.0, max(0.0, step / max(1, total_steps - 1)))
    return {task: (1 - t) * float(cfg.start.get(task, 0.0)) + t * float(cfg.end.get(task, 0.0))
            for task in TASKS}


# ---------------------------------------------------------------------------------------------
# One sample → one sequence of a given task
# ---------------------------------------------------------------------------------------------

def sample_tasks(meta: dict) -> set[str]:
    """Tasks a sample's meta can serve (see the module docstring)."""
    tasks = set()
    if _qa_pairs(meta):
        tasks |= {"vqa", "chat"}
    if _captions(meta):
        tasks |= {"caption", "t2i", "text"}
    if _conversation(meta) is not None:
        tasks.add("chat")
    return tasks


def _conversation(meta: dict) -> list[dict] | None:
    """``meta["conversations"]`` when it is a list of ``{"role": str, "text": str}`` turns, else
    None (the roles are checked by the builder: a bad order is a UserError, skipped by the stream)."""
    turns = meta.get("conversations")
    if not isinstance(turns, list) or not turns or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("text"), str)
            for t in turns):
        return None
    return turns


def _qa_pairs(meta: dict) -> list[tuple[str, str]]:
    pairs = meta.get("qa")
    if not isinstance(pairs, list):
        return []
    return [(str(p["question"]), str(p["answer"])) for p in pairs
            if isinstance(p, dict) and p.get("question") and p.get("answer") is not None]


def _captions(meta: dict) -> list[str]:
    captions = meta.get("captions")
    if not isinstance(captions, list):
        return []
    return [c for c in captions if isinstance(c, str) and c.strip()]


def qa_turns(pairs: list[tuple[str, str]], image_codes) -> list[Turn]:
    """(question, answer) pairs as chat turns, the image in the first user turn."""
    turns: list[Turn] = []
    for index, (question, answer) in enumerate(pairs):
        turns += [Turn("user", question, image_codes if index == 0 else None), Turn("assistant", answer)]
    return turns


def _conversation_turns(meta: dict, image_codes) -> list[Turn]:
    turns = []
    for index, turn in enumerate(meta["conversations"]):
        image = image_codes if index == meta.get("image_turn", 0) else None
        turns.append(Turn(role=turn["role"], text=turn["text"], image_codes=image))
    return turns


def build_sequence(task: str, image_codes, meta: dict, rng: random.Random, cfg: MixtureConfig,
                   builder: SequenceBuilder) -> Optional[Sequence]:
    """The ``task`` sequence of one sample (None when the builder drops it as too long)."""
    if task == "vqa":
        question, answer = rng.choice(_qa_pairs(meta))
        return builder.understanding(image_codes, question, answer, task="vqa")
    if task == "caption":
        return builder.understanding(image_codes, rng.choice(cfg.caption_prompts),
                                     rng.choice(_captions(meta)), task="caption")
    if task == "t2i":
        drop = rng.random() < cfg.caption_dropout
        return builder.generation(rng.choice(_captions(meta)), image_codes, drop_caption=drop)
    if task == "text":
        return builder.text_only(rng.choice(_captions(meta)))
    if task == "chat":
        if _conversation(meta) is not None:
            return builder.chat(_conversation_turns(meta, image_codes), task="chat")
        pairs = _qa_pairs(meta)
        return builder.chat(qa_turns(rng.sample(pairs, min(cfg.chat_turns, len(pairs))), image_codes), task="chat")
    raise UserError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------

class MixedTaskStream:
    """Endless mixed-task sequences for this rank, resumable from :meth:`state`."""

    def __init__(self, sources: list[SourceConfig], cfg: MixtureConfig, builder: SequenceBuilder, *,
                 tokenizer_hash: str | None, total_steps: int, seed: int, rank: int,
                 shuffle_buffer: int = 1000, state: dict | None = None, skip_log: SkipLog | None = None):
        if not sources:
            raise UserError("data.sources is empty: give at least one precomputed codes directory")
        cfg.validate()
        self.sources, self.cfg, self.builder = sources, cfg, builder
        self.total_steps, self.seed, self.rank = total_steps, seed, rank
        self.skip_log = skip_log or SkipLog()
        self.passed_over: dict[str, int] = {}
        state = state or {}
        self.sequences = int(state.get("sequences", 0))
        self.read = list(state.get("read", [0] * len(sources)))
        if len(self.read) != len(sources):
            raise UserError(f"checkpoint has data positions for {len(self.read)} sources, "
                            f"the config lists {len(sources)}")
        self._iters = [self._open(source, index, tokenizer_hash, shuffle_buffer)
                       for index, source in enumerate(sources)]

    def _open(self, source: SourceConfig, index: int, tokenizer_hash, shuffle_buffer) -> Iterator:
        for task in source.tasks:
            if task not in TASKS:
                raise UserError(f"source {source.codes}: unknown task {task!r}; known: {', '.join(TASKS)}")
        stream = read_precomputed(Path(source.codes), source.split, tokenizer_hash, shuffle_buffer=shuffle_buffer,
                                  seed=self.seed + index, repeat=True, skip_log=self.skip_log)
        return islice(stream, self.read[index], None)  # resume: skip what was already read

    def state(self) -> dict:
        return {"sequences": self.sequences, "read": list(self.read)}

    def _draw_sample(self, source_index: int, task: str) -> tuple:
        for _ in range(MAX_DRAWS):
            key, codes, meta = next(self._iters[source_index])
            self.read[source_index] += 1
            if task in sample_tasks(meta):
                return key, codes, meta
            self.passed_over[task] = self.passed_over.get(task, 0) + 1
        raise UserError(f"source {self.sources[source_index].codes}: {MAX_DRAWS} samples in a row cannot "
                        f"serve task {task!r}; remove it from that source's tasks")

    def next_sequence(self, step: int) -> Sequence:
        """The next sequence, its task drawn from the weights at ``step``."""
        while True:
            rng = random.Random(f"{self.seed}/{self.rank}/{self.sequences}")
            self.sequences += 1
            weights = weights_at(self.cfg, step, self.total_steps)
            task = rng.choices(TASKS, weights=[weights[t] for t in TASKS])[0]
            serving = [i for i, s in enumerate(self.sources) if task in s.tasks]
            if not serving:
                raise UserError(f"task {task!r} has weight > 0 but no source lists it in its tasks")
            source = rng.choice(serving)
            key, codes, meta = self._draw_sample(source, task)
            try:
                sequence = build_sequence(task, codes, meta, rng, self.cfg, self.builder)
            except (UserError, ValueError) as err:  # a malformed sample (bad codes, empty answer, ...)
                self.skip_log.skip(str(self.sources[source].codes), key, f"unusable sample: {err}")
                continue
            if sequence is not None:  # None: too long, counted by the builder's stats
                return sequence

    def next_batch(self, batch_size: int, step: int, pad_id: int) -> Batch:
        return collate([self.next_sequence(step) for _ in range(batch_size)], pad_id)


# Held-out key of the t2i samples' images with the caption dropped (the CFG prompt): its loss
# minus t2i's is how much the caption tells the model about the image (see text_gain).
UNCONDITIONAL_T2I = "t2i_uncond"


def eval_sequences(source: SourceConfig, cfg: MixtureConfig, builder: SequenceBuilder, *,
                   tokenizer_hash: str | None, per_task: int, seed: int = 0) -> dict[str, list[Sequence]]:
    """A fixed held-out set: the first ``per_task`` usable samples of ``source`` for each task.

    Deterministic (file order, seeded choices, no caption dropout), so the eval loss at every
    step and across resumes is measured on the same sequences. When there are t2i samples,
    :data:`UNCONDITIONAL_T2I` holds the same images after an empty caption.
    """
    fixed = dataclasses.replace(cfg, caption_dropout=0.0)
    out: dict[str, list[Sequence]] = {task: [] for task in TASKS if task in source.tasks}
    uncaptioned: list[Sequence] = []  # the t2i images after an empty caption, in step with out["t2i"]
    samples = read_precomputed(Path(source.codes), source.split, tokenizer_hash, split_by_rank=False)
    for index, (_, codes, meta) in enumerate(samples):
        for task in sample_tasks(meta) & set(out):
            if len(out[task]) < per_task:
                rng = random.Random(f"eval/{seed}/{index}/{task}")
                sequence = build_sequence(task, codes, meta, rng, fixed, builder)
                if sequence is not None:
                    out[task].append(sequence)
                    if task == "t2i":  # an empty caption fits wherever the captioned one did
                        uncaptioned.append(builder.generation("", codes, drop_caption=True))
        if all(len(seqs) >= per_task for seqs in out.values()):
            break
    held_out = {task: seqs for task, seqs in out.items() if seqs}
    if uncaptioned:
        held_out[UNCONDITIONAL_T2I] = uncaptioned
    return held_out


def text_gain(losses: dict[str, float], held_out: dict[str, list[Sequence]]) -> float | None:
    """Held-out loss of a t2i sequence without its caption minus with it, in nats per sequence
    (summed over its scored ids: ``<boi>``, the image ids, ``<eoi>``, ``<eos>``).

    ``losses``: :func:`unified_mm.quick_eval.heldout_losses` of ``held_out``
    (:func:`eval_sequences`). Near 0 means the model draws the same image whatever the prompt
    says: then no guidance scale can make text-to-image follow the prompt. None when the
    held-out set had no t2i samples.
    """
    if "t2i" not in losses or UNCONDITIONAL_T2I not in losses or not held_out.get("t2i"):
        return None
    scored = sum(label != IGNORE_INDEX for label in held_out["t2i"][0].labels)  # the same for every image
    return (losses[UNCONDITIONAL_T2I] - losses["t2i"]) * scored
