"""KV-cached decoding of left-padded batches: the state machinery the samplers share, and greedy text.

Prompts of different lengths are *left*-padded so every row's next token sits in the last column;
position ids are counted over real tokens only, so a padded row computes exactly what it would
alone (up to floating-point summation order). Outputs are constrained to text ids (the
modality-separated softmax: image ids are never produced outside an image span). Generation stops
per row at ``<eos>``.

:class:`DecodeState` is what text decoding, text-to-image sampling (``unified_mm.sampling``) and
chat (``unified_mm.chat``) have in common: a ``transformers.DynamicCache``, the 2D attention mask of
everything cached, each row's next position id, each row's last hidden state, and (for a model
with image position embeddings, ``unified_mm.image_positions``) the index its next image id
would take inside its image span. The logits are
computed from the hidden state by :func:`head_logits` on *one id range only* (the text ids, or one
image group): the LM head's cost then scales with the range, not with the whole unified
vocabulary, and ids outside the range cannot be produced at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from unified_mm.image_positions import image_position_embedding
from unified_mm.vocab import Vocab


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), attention_mask (B, P)) with every prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


class BufferedLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes into a preallocated buffer instead of concatenating.

    ``DynamicLayer.update`` copies the whole cache every step (``torch.cat``), O(T²) bytes over a
    span; here each step writes only its new keys/values and ``keys``/``values`` are views of the
    filled part (grown by doubling when the reserve runs out). Lengths and mask sizes are
    inherited (the views have the shapes a ``DynamicLayer``'s tensors would have); the inherited
    row selection / cropping ops are followed by re-buffering their result.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, dim = key_states.shape
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, dim)
        self.value_buffer = value_states.new_empty(batch, value_states.shape[1], self.capacity,
                                                   value_states.shape[-1])
        self.length = 0
        self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        self.capacity = max(needed, 2 * self.capacity)
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], self.capacity, old.shape[-1])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self.key_buffer[:, :, self.length: end] = key_states
        self.value_buffer[:, :, self.length: end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values


    def _adopt(self) -> None:
        """Re-buffer ``keys``/``values`` after an inherited op replaced them."""
        if self.is_initialized and self.keys is not None:
            keys, values = self.keys, self.values
            self.is_initialized = False
            self.capacity = max(self.capacity, keys.shape[-2])
            self.update(keys, values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._adopt()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._adopt()


def new_cache(model: LlamaForCausalLM, capacity: int,
              data: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """A ``DynamicCache`` of :class:`BufferedLayer` s reserving ``capacity`` positions, optionally
    filled with per-layer (keys, values) (B, kv_heads, T, head_dim)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [BufferedLayer(capacity) for _ in cache.layers]
    for layer, (keys, values) in zip(cache.layers, data or ()):
        layer.update(keys, values)
    return cache


def cache_capacity(cache: DynamicCache) -> int:
    return max(getattr(layer, "capacity", 0) for layer in cache.layers)


@dataclass
class DecodeState:
    """Everything needed to continue a batch of sequences by one or more tokens."""

    cache: DynamicCache  # per layer keys/values (B, kv_heads, T, head_dim)
    mask: torch.Tensor  # (B, T) long: 1 on real (cached) tokens, 0 on left padding
    next_positions: torch.Tensor  # (B,) long: position id of each row's next token
    hidden: torch.Tensor  # (B, hidden) final-norm hidden state of each row's last token
    # (B,) long: index inside its image span the row's next image id would get (image_positions.py)
    span_offset: torch.Tensor

    @property
    def rows(self) -> int:
        return self.mask.shape[0]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             cache: DynamicCache, span_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the decoder body (no LM head) on ids (B, k) that continue rows whose next image id
    would take index ``span_start`` (B,) in its span; returns the last hidden state (B, hidden)
    and the rows' next span offsets (B,)."""
    places = image_position_embedding(model)
    if places is None:
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return out.last_hidden_state[:, -1], span_start
    # the embedding cannot see a <boi> that is already in the cache: it continues from span_start
    embeds, next_offset = places.continuation(ids, span_start)
    out = model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return out.last_hidden_state[:, -1], next_offset


def prefill(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], pad_id: int,
            reserve: int = 0) -> DecodeState:
    """Left-pad and run the prompts once, filling a fresh cache with room for ``reserve`` more
    tokens per row (it grows past that if needed)."""
    device = model_device(model)
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): real tokens count from 0
    cache = new_cache(model, ids.shape[1] + reserve)
    hidden, span_offset = _forward(model, ids, mask, positions, cache, torch.zeros_like(mask[:, 0]))
    return DecodeState(cache, mask, mask.sum(-1), hidden, span_offset)


def _attention_mask(model: LlamaForCausalLM, mask: torch.Tensor, k: int) -> torch.Tensor:
    """What the model gets as ``attention_mask`` for ``k`` new tokens over ``mask`` (B, T).

    One new token under SDPA: the ready 4D boolean mask (B, 1, 1, T), which transformers passes
    through as is (a single query needs no causal part), saving its mask construction on every
    decode step. Otherwise the 2D mask, from which transformers builds the causal one.
    """
    if k == 1 and getattr(model.config, "_attn_implementation", None) == "sdpa":
        return mask.bool()[:, None, None, :]
    return mask


def advance(model: LlamaForCausalLM, state: DecodeState, ids: torch.Tensor) -> DecodeState:
    """Feed ids (B, k) (k new tokens per row, all real) and return the advanced state (the cache is
    extended in place)."""
    k = ids.shape[1]
    mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1]).expand(-1, k)], dim=1)
    positions = state.next_positions[:, None] + torch.arange(k, device=ids.device)  # (B, k)
    hidden, span_offset = _forward(model, ids, _attention_mask(model, mask, k), positions, state.cache,
                                   state.span_offset)
    return DecodeState(state.cache, mask, state.next_positions + k, hidden, span_offset)


def head_logits(model: LlamaForCausalLM, hidden: torch.Tensor, start: int = 0,
                end: int | None = None) -> torch.Tensor:
    """Logits (B, end - start) float32 of ids [start, end) only: rows of the LM head's weight (a
    contiguous view), so a 2^g-id image group costs 2^g dot products per row, not the vocabulary's.
    Equals ``model.lm_head(hidden)[:, start:end]`` (LlamaForCausalLM's head is a bias-free Linear)."""
    weight = model.lm_head.weight[start:end]  # (end - start, hidden)
    return F.linear(hidden, weight).float()


def select_rows(model: LlamaForCausalLM, state: DecodeState, index: torch.Tensor) -> DecodeState:
    """A new state holding rows ``index`` (R,) of ``state`` (rows may repeat: the cache is copied,
    so the new rows continue independently of the old state and of each other)."""
    index = index.to(state.mask.device)
    data = [(layer.keys.index_select(0, index), layer.values.index_select(0, index))
            for layer in state.cache.layers]
    return DecodeState(new_cache(model, cache_capacity(state.cache), data), state.mask.index_select(0, index),
                       state.next_positions.index_select(0, index), state.hidden.index_select(0, index),
                       state.span_offset.index_select(0, index))


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad ``tensor`` on the left of ``dim`` up to ``width`` (padding is masked out anyway)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def concat_states(model: LlamaForCausalLM, states: Sequence[DecodeState]) -> DecodeState:
    """Stack the rows of several states into one batch; shorter caches are left-padded (masked)."""
    width = max(s.mask.shape[1] for s in states)
    data = []
    for i in range(len(states[0].cache.layers)):
        keys = torch.cat([_pad_left(s.cache.layers[i].keys, width, 2) for s in states])  # (B, h, T, d)
        values = torch.cat([_pad_left(s.cache.layers[i].values, width, 2) for s in states])
        data.append((keys, values))
    mask = torch.cat([_pad_left(s.mask, width, 1) for s in states])
    reserve = max(cache_capacity(s.cache) - s.mask.shape[1] for s in states)
    return DecodeState(new_cache(model, width + reserve, data), mask,
                       torch.cat([s.next_positions for s in states]), torch.cat([s.hidden for s in states]),
                       torch.cat([s.span_offset for s in states]))


@torch.inference_mode()
def greedy_text(model: LlamaForCausalLM, vocab: Vocab, prompts: Sequence[Sequence[int]], *, pad_id: int,
                eos_id: int, max_new_tokens: int = 32) -> list[list[int]]:
    """Greedy continuation of each prompt, text ids only, up to and excluding ``<eos>``."""
    state = prefill(model, prompts, pad_id, reserve=max_new_tokens)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=state.mask.device)
    for step in range(max_new_tokens):
        next_ids = head_logits(model, state.hidden, 0, vocab.image_start).argmax(-1)  # (B,) text ids
        next_ids = torch.where(done, torch.full_like(next_ids, eos_id), next_ids)
        for row in (~done & (next_ids != eos_id)).nonzero().flatten().tolist():
            outputs[row].append(int(next_ids[row]))
        done |= next_ids == eos_id
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        state = advance(model, state, next_ids[:, None])
    return outputs
