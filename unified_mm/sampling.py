"""Text-to-image sampling: batched classifier-free guidance over the structured image span.

One decode step runs ONE forward over ``[conditional rows; unconditional rows]``; the guided
logits ``u + s·(c − u)`` are computed on the current group's id range only (the LM head is applied
to that range only: :func:`unified_mm.generate.head_logits`), then temperature, top-k and top-p act
on that slice and a code is drawn. The structural constraint therefore holds by construction: the
``t``-th id of the span is ``group_range(span_group(t)).start + code`` with ``code`` in
``[0, 2^g)``, exactly ``vocab.tokens_per_image`` ids are drawn, and ``<eoi>`` is appended without
sampling (its forward is only needed when decoding continues, as in chat).

Why the pieces are shaped this way:

* The unconditional prompt (``generation_prompt("")``, the caption-dropped training sample) is the
  same for every image, so it is prefilled once per call (batch 1) and its KV cache copied into
  every unconditional row of every batch; conditional prompts are prefilled once per *distinct*
  prompt of a batch and copied to its ``n`` samples.
* ``cfg_scale == 1`` is conditional sampling, so the unconditional rows are skipped entirely (half
  the work, and bit-for-bit the conditional-only result).
* Per-sample seeds: row ``i`` draws its noise from its own ``torch.Generator`` seeded with its seed,
  the same amount every step (one uniform per id of the group), and samples by the exponential
  race ``argmax(p / E)``, ``E = −log U`` (an exact sample from ``p``, vectorised over rows). So a
  sample's random numbers never depend on its batch neighbours; only floating-point summation
  order can (tests measure the match rate alone vs in a batch).
* Generators live on the model's device: the same seed gives different images on CPU and CUDA.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Sequence

import torch
from transformers import LlamaForCausalLM

from mmcore.errors import UserError
from unified_mm.generate import (DecodeState, advance, concat_states, head_logits, model_device, prefill,
                                 select_rows)
from unified_mm.sequence import SequenceBuilder
from unified_mm.vocab import Vocab

Progress = Callable[[int], None]  # called with the number of image tokens produced by a step


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How image ids are drawn. ``temperature`` 0 is argmax; ``top_k`` 0 and ``top_p`` 1 are off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 3.0
    seed: int = 0

    def __post_init__(self):
        checks = {"temperature": (self.temperature, self.temperature >= 0, ">= 0"),
                  "top_k": (self.top_k, self.top_k >= 0, ">= 0 (0 = off)"),
                  "top_p": (self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
                  "cfg_scale": (self.cfg_scale, self.cfg_scale >= 0, ">= 0")}
        for name, (value, ok, rule) in checks.items():
            if isinstance(value, bool) or not math.isfinite(value) or not ok:
                raise UserError(f"sampler setting {name} must be {rule}, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise UserError(f"sampler setting top_k must be an integer, got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"sampler setting seed must be an integer >= 0, got {self.seed!r}")

    @classmethod
    def from_defaults(cls, defaults: dict, **overrides) -> "SamplerSettings":
        """The export's ``sampler_defaults`` (unknown keys such as ``max_new_tokens`` ignored),
        overridden by every override that is not None."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in defaults.items() if k in fields}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - fields
        if unknown:
            raise UserError(f"unknown sampler settings: {', '.join(sorted(unknown))}")
        if "top_k" in values and isinstance(values["top_k"], float) and values["top_k"].is_integer():
            values["top_k"] = int(values["top_k"])
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SpanResult(NamedTuple):
    codes: torch.Tensor  # (rows, tokens_per_image) long, each in [0, 2^g) of its position's group
    state: DecodeState  # after the span minus its last id (rows [cond; uncond])


class SampledImage(NamedTuple):
    prompt: str
    seed: int
    image_codes: torch.Tensor  # (N, code_groups) long: the tokenizer's group indices, on the CPU
    ids: list[int]  # the generated continuation of the prompt: N·G image ids, then <eoi>


# ---------------------------------------------------------------------------------------------
# Drawing one id per row from a group's logits
# ---------------------------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering of logits (B, V): dropped entries become -inf.

    top-k keeps every id whose logit is >= the k-th largest (ties at the boundary are all kept).
    top-p keeps the smallest set of most probable ids whose probability (of the top-k-filtered
    softmax) sums to >= top_p: an id is kept iff the mass strictly above it is < top_p, so the most
    probable id is always kept.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(-1)
        mass_above = probs.cumsum(-1) - probs  # (B, V)
        drop_sorted = mass_above >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to id order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def make_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One generator per row, seeded with the row's seed."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def draw(logits: torch.Tensor, settings: SamplerSettings, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One index per row of logits (B, V) float32 → (B,) long.

    Temperature 0 is argmax (no noise drawn). Otherwise every row draws exactly V uniforms from its
    own generator, whatever the settings, so its stream stays aligned with its seed.
    """
    if settings.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
    probs = logits.softmax(-1)  # (B, V); 0 on filtered ids
    width = logits.shape[-1]
    uniform = torch.stack([torch.rand(width, generator=g, device=logits.device) for g in generators])
    race = probs / -torch.log(uniform)  # exponential race: argmax is a sample from probs
    return race.argmax(-1)


# ---------------------------------------------------------------------------------------------
# The image span
# ---------------------------------------------------------------------------------------------

def guided(logits: torch.Tensor, rows: int, scale: float) -> torch.Tensor:
    """logits (2·rows, V) [conditional; unconditional] → u + scale·(c − u), (rows, V); logits
    (rows, V) (no unconditional rows) are returned as they are."""
    if logits.shape[0] == rows:
        return logits
    cond, uncond = logits[:rows], logits[rows:]
    return uncond + scale * (cond - uncond)


@torch.inference_mode()
def sample_span(model: LlamaForCausalLM, vocab: Vocab, state: DecodeState, rows: int, settings: SamplerSettings,
                generators: Sequence[torch.Generator], progress: Progress | None = None) -> SpanResult:
    """Draw one image span for ``rows`` sequences whose next token is the first image id.

    ``state`` holds ``rows`` conditional rows, followed (with guidance) by ``rows`` unconditional
    rows; each unconditional row is fed the id its conditional row drew. The last id is not fed:
    callers that continue decoding (chat) feed it together with ``<eoi>`` to the returned state.
    """
    length = vocab.tokens_per_image
    codes = torch.empty(rows, length, dtype=torch.long, device=state.hidden.device)
    for t in range(length):
        start, end = vocab.group_range(vocab.span_group(t))
        logits = guided(head_logits(model, state.hidden, start, end), rows, settings.cfg_scale)  # (rows, 2^g)
        codes[:, t] = draw(logits, settings, generators)
        if t + 1 < length:
            ids = (codes[:, t] + start).repeat(state.rows // rows)[:, None]  # (state rows, 1)
            state = advance(model, state, ids)
        if progress is not None:
            progress(rows)
    return SpanResult(codes, state)


def with_unconditional(model: LlamaForCausalLM, state: DecodeState, uncond: DecodeState | None) -> DecodeState:
    """``[state rows; one copy of the (batch-1) unconditional prefix per row]``, or ``state`` as it
    is when ``uncond`` is None (no guidance)."""
    if uncond is None:
        return state
    copies = select_rows(model, uncond, torch.zeros(state.rows, dtype=torch.long))
    return concat_states(model, [state, copies])


def unconditional_prefix(model: LlamaForCausalLM, builder: SequenceBuilder,
                         settings: SamplerSettings) -> DecodeState | None:
    """The prefilled unconditional prompt (batch 1), or None when ``cfg_scale`` is 1."""
    if settings.cfg_scale == 1:
        return None
    return prefill(model, [builder.generation_prompt("")], builder.text_tokenizer.pad_id,
                   reserve=builder.vocab.tokens_per_image)


def codes_to_span_ids(vocab: Vocab, codes: torch.Tensor) -> torch.Tensor:
    """Sampled span codes (B, N·G), each in its position's group → unified image ids (B, N·G)."""
    return vocab.group_indices_to_ids(codes.unflatten(-1, (vocab.num_patches, vocab.num_groups)))


# ---------------------------------------------------------------------------------------------
# Prompts and the public API
# ---------------------------------------------------------------------------------------------

def context_length(model: LlamaForCausalLM, builder: SequenceBuilder) -> int:
    """Tokens a sequence may hold: the builder's max_length, at most the model's positions."""
    return min(builder.max_length, int(model.config.max_position_embeddings))


def generation_ids(model: LlamaForCausalLM, builder: SequenceBuilder, prompt: str) -> list[int]:
    """``generation_prompt(prompt)``, or a UserError if the caption would have to be cut to leave
    room for the image span (training cuts silently; a user asking for an image should know)."""
    if not isinstance(prompt, str):
        raise UserError(f"prompts must be strings, got {type(prompt).__name__}")
    caption = builder.text_tokenizer.encode(prompt)
    context = context_length(model, builder)
    # <bos> <user> caption <assistant> <boi> img <eoi> <eos>
    room = context - builder.vocab.tokens_per_image - 6
    if len(caption) > room:
        raise UserError(f"prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} is {len(caption)} "
                        f"tokens; the context ({context} tokens) leaves {max(room, 0)} beside the "
                        f"{builder.vocab.tokens_per_image}-token image span")
    return builder.generation_prompt(prompt)


class _Job(NamedTuple):
    prompt: str
    seed: int


def _jobs(prompts: Sequence[str], n_per_prompt: int, settings: SamplerSettings,
          seeds: Sequence[int] | None) -> list[_Job]:
    """Prompt-major order; default seeds are settings.seed + index, so any image can be redrawn
    alone with its recorded seed."""
    if n_per_prompt < 1:
        raise UserError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    if not prompts:
        raise UserError("no prompts given")
    total = len(prompts) * n_per_prompt
    if seeds is None:
        seeds = [settings.seed + i for i in range(total)]
    if len(seeds) != total:
        raise UserError(f"{len(seeds)} seeds given for {total} images ({len(prompts)} prompts x {n_per_prompt})")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserError(f"seeds must be integers >= 0, got {seed!r}")
    return [_Job(prompts[i // n_per_prompt], int(seed)) for i, seed in enumerate(seeds)]


def _conditional_state(model: LlamaForCausalLM, prompt_ids: dict[str, list[int]], jobs: Sequence[_Job],
                       pad_id: int, reserve: int) -> DecodeState:
    """Prefill each distinct prompt of the batch once, then copy its cache to each of its rows."""
    distinct = list(dict.fromkeys(job.prompt for job in jobs))
    state = prefill(model, [prompt_ids[p] for p in distinct], pad_id, reserve=reserve)
    index = torch.tensor([distinct.index(job.prompt) for job in jobs])
    if index.tolist() == list(range(len(distinct))):
        return state
    return select_rows(model, state, index)


@torch.inference_mode()
def sample_images(model: LlamaForCausalLM, vocab: Vocab, builder: SequenceBuilder, prompts: Sequence[str],
                  n_per_prompt: int = 1, settings: SamplerSettings | None = None,
                  seeds: Sequence[int] | None = None, batch_size: int = 8,
                  progress: Progress | None = None) -> list[SampledImage]:
    """Sample ``n_per_prompt`` images per prompt (prompt-major order), ``batch_size`` images per
    forward (twice as many rows with guidance). ``seeds``: one per image, default
    ``settings.seed + i``. Prompt "" is unconditional."""
    settings = settings or SamplerSettings()
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    jobs = _jobs(prompts, n_per_prompt, settings, seeds)
    prompt_ids = {p: generation_ids(model, builder, p) for p in dict.fromkeys(prompts)}
    pad_id = builder.text_tokenizer.pad_id
    uncond = unconditional_prefix(model, builder, settings)  # once per call
    device = model_device(model)
    results: list[SampledImage] = []
    for first in range(0, len(jobs), batch_size):
        chunk = jobs[first: first + batch_size]
        cond = _conditional_state(model, prompt_ids, chunk, pad_id, vocab.tokens_per_image)
        state = with_unconditional(model, cond, uncond)  # (B or 2B rows)
        generators = make_generators([job.seed for job in chunk], device)
        codes = sample_span(model, vocab, state, len(chunk), settings, generators, progress).codes.cpu()
        ids = codes_to_span_ids(vocab, codes)  # (B, N·G)
        eoi = builder.text_tokenizer.eoi_id
        image_codes = vocab.ids_to_codes(ids)  # (B, N, code_groups): the tokenizer's grouping
        for job, row_codes, row_ids in zip(chunk, image_codes, ids):
            results.append(SampledImage(job.prompt, job.seed, row_codes, [*row_ids.tolist(), eoi]))
    return results
