"""Modality-separated softmax (QLIP's unified model): the loss and the sampler's logit mask.

A position whose target is a text or special id is scored by a softmax over ``[0, image_start)``
only; a position whose target is an image id of group ``k`` by a softmax over group ``k``'s range
only. The two modalities therefore never compete for probability mass: text quality does not
depend on how the image logits are scaled, nor the other way round, and an image position cannot
leak mass onto text (or the wrong group). Sampling applies the same restriction
(:func:`constrain_logits`), so what is sampled is what was trained.

The group of a labelled position is read off its *target* id, which is right for teacher forcing:
inside an image span the target of offset ``j`` is an id of group ``j mod G`` (``unified_mm.vocab``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from unified_mm.sequence import IGNORE_INDEX
from unified_mm.vocab import TEXT, Vocab


class TokenLosses(NamedTuple):
    losses: torch.Tensor  # (B, T-1) float32, per-token NLL; 0 where ignored
    mask: torch.Tensor  # (B, T-1) bool, True where a label applies


def _check_vocab_size(logits: torch.Tensor, vocab: Vocab) -> None:
    if logits.shape[-1] != vocab.size:
        raise ValueError(f"logits have {logits.shape[-1]} entries in the last dim, the unified "
                         f"vocabulary has {vocab.size}")


def _slices(vocab: Vocab) -> list[tuple[int, int, int]]:
    """``(group, start, end)`` for text (group TEXT) and each image group."""
    return [(TEXT, 0, vocab.image_start),
            *((k, *vocab.group_range(k)) for k in range(vocab.num_groups))]


class LabelledPositions(NamedTuple):
    mask: torch.Tensor  # (B, T-1) bool: position t predicts labels[:, t + 1], which is labelled
    batch_index: torch.Tensor  # (M,) long: row of each labelled position
    time_index: torch.Tensor  # (M,) long: position (into logits / hidden states) that predicts it
    targets: torch.Tensor  # (M,) long: the target ids


def labelled_positions(labels: torch.Tensor, vocab: Vocab) -> LabelledPositions:
    """Where ``labels`` (B, T) ask for a prediction, after the shift; checks the target ids."""
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX  # (B, T-1)
    selected_targets = targets[mask]  # (M,)
    if selected_targets.numel() and (int(selected_targets.min()) < 0
                                     or int(selected_targets.max()) >= vocab.size):
        bad = selected_targets[(selected_targets < 0) | (selected_targets >= vocab.size)][0]
        raise ValueError(f"label {int(bad)} is outside the vocabulary [0, {vocab.size}) "
                         f"(and is not IGNORE_INDEX {IGNORE_INDEX})")
    b, t = mask.nonzero(as_tuple=True)  # (M,) each, in the row-major order of mask
    return LabelledPositions(mask, b, t, selected_targets)


def _row_losses(row_logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                vocab: Vocab) -> torch.Tensor:
    """(M,) NLL of ``targets`` (M,) under the modality-separated softmax of ``row_logits[rows]``
    (``row_logits`` (N, V); ``rows`` (M,) indexes it). Only each row's own slice is gathered and
    upcast to float32."""
    target_logit = row_logits[rows, targets].float()  # (M,)
    groups = vocab.group_of(targets)  # (M,) TEXT or image group
    lse = torch.zeros_like(target_logit)  # (M,)
    for group, start, end in _slices(vocab):
        members = (groups == group).nonzero().squeeze(1)  # (M_g,) indices into the M positions
        if members.numel():
            # Copies only (M_g, end - start): each row's own slice, never the full (M, V).
            sliced = row_logits[:, start:end][rows[members]].float()
            lse = lse.index_put((members,), torch.logsumexp(sliced, dim=-1))
    return lse - target_logit


def _scatter(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    losses = torch.zeros(mask.shape, dtype=per_token.dtype, device=per_token.device)
    return losses.masked_scatter(mask, per_token)  # (B, T-1)


def modality_token_losses(logits: torch.Tensor, labels: torch.Tensor, vocab: Vocab) -> TokenLosses:
    """Per-token NLL under the modality-separated softmax; shifts inside.

    logits (B, T, V) any float dtype (upcast to float32 per slice), labels (B, T) long with
    IGNORE_INDEX where no loss applies. For each labelled position only its allowed slice is
    gathered and upcast (memory: neither (B, T, V) in float32 nor the labelled rows' full V is ever
    copied), and its logsumexp runs over that slice only, so disallowed ids get no gradient path at
    all (exactly 0), even if some of them are inf.
    """
    _check_vocab_size(logits, vocab)
    if logits.shape[:2] != labels.shape or logits.dim() != 3:
        raise ValueError(f"logits (B, T, V) and labels (B, T) disagree: {tuple(logits.shape)} vs "
                         f"{tuple(labels.shape)}")
    where = labelled_positions(labels, vocab)
    batch, length = labels.shape
    flat = logits.reshape(batch * length, vocab.size)  # (B·T, V), a view for contiguous logits
    rows = where.batch_index * length + where.time_index  # (M,) rows of flat
    return TokenLosses(_scatter(_row_losses(flat, rows, where.targets, vocab), where.mask), where.mask)


def modality_token_losses_from_hidden(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                                      vocab: Vocab) -> TokenLosses:
    """:func:`modality_token_losses` of ``head(hidden)`` without the full logits.

    hidden (B, T, D): the decoder's final (normed) hidden states; ``head``: its output layer
    (``lm_head``). Logits are computed only at labelled positions: a conversation labels ~15 of
    ~200 positions, so the (B, T, V) logits tensor, its matmul and its backward mostly go to
    positions no loss reads.
    """
    if hidden.shape[:2] != labels.shape or hidden.dim() != 3:
        raise ValueError(f"hidden (B, T, D) and labels (B, T) disagree: {tuple(hidden.shape)} vs "
                         f"{tuple(labels.shape)}")
    where = labelled_positions(labels, vocab)
    row_logits = head(hidden[where.batch_index, where.time_index])  # (M, V)
    _check_vocab_size(row_logits, vocab)
    rows = torch.arange(row_logits.shape[0], device=row_logits.device)
    return TokenLosses(_scatter(_row_losses(row_logits, rows, where.targets, vocab), where.mask), where.mask)


def modality_loss(logits: torch.Tensor, labels: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Mean NLL over labelled tokens (0, still attached to the graph, when none are labelled:
    an all-truncated micro-batch must not make the step NaN)."""
    token_losses = modality_token_losses(logits, labels, vocab)
    return token_losses.losses.sum() / token_losses.mask.sum().clamp(min=1)


def weighted_mean_loss(token_losses: TokenLosses, labels: torch.Tensor, vocab: Vocab,
                       image_token_weight: float = 1.0) -> torch.Tensor:
    """The training loss: a weighted mean over labelled tokens, image-id targets weighted by
    ``image_token_weight`` and text targets by 1, divided by the sum of the weights.

    Why a weight: a text-to-image sequence labels all h·w·G image ids (128 with a patch-4
    tokenizer; the demo's cell tokenizer has 18) while a 5-question conversation labels ~15 answer
    tokens: with 128 ids per image 83.4% of the mixture's labelled
    tokens are image targets (100 micro-batches of 16), so a plain token mean gives image
    prediction 83% of the loss (55.7% at weight 0.25). Emu3 down-weights vision tokens (0.5) for
    the same reason. With 18 ids per image the demo uses weight 1 (configs/unified/tiny.yaml).
    With weight 1 this is exactly the plain token mean; with 0, the mean over text targets only.
    ``labels`` (B, T) as given to :func:`modality_token_losses` (shifted inside, like there).
    """
    losses, mask = token_losses
    if image_token_weight == 1.0:
        return losses.sum() / mask.sum().clamp(min=1)
    if image_token_weight < 0:
        raise ValueError(f"image_token_weight must be >= 0, got {image_token_weight}")
    targets = labels[:, 1:].to(losses.device)  # (B, T-1), aligned with losses
    is_image = mask & (targets >= vocab.image_start)
    weights = torch.where(is_image, image_token_weight, 1.0) * mask  # (B, T-1), 0 where unlabelled
    return (losses * weights).sum() / weights.sum().clamp(min=1e-12)


def per_task_losses(token_losses: TokenLosses, task_index: torch.Tensor,
                    num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss sums (num_tasks,) float32 and labelled-token counts (num_tasks,) int64 per task.

    Sums and counts, not means, so they can be all-reduced across ranks and accumulated over steps
    before dividing. The sums stay on the graph (detach them for logging).
    """
    losses, mask = token_losses
    if task_index.shape != (losses.shape[0],):
        raise ValueError(f"task_index must have shape ({losses.shape[0]},), got {tuple(task_index.shape)}")
    if task_index.numel() and (int(task_index.min()) < 0 or int(task_index.max()) >= num_tasks):
        raise ValueError(f"task_index values must lie in [0, {num_tasks})")
    index = task_index.to(losses.device).long()
    sums = losses.new_zeros(num_tasks).index_add(0, index, losses.sum(dim=1))
    counts = torch.zeros(num_tasks, dtype=torch.long, device=losses.device)
    counts = counts.index_add(0, index, mask.sum(dim=1).long())
    return sums, counts


def constrain_logits(logits: torch.Tensor, group: int | torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Set logits outside the allowed range to -inf (returns a new tensor).

    logits (..., V). ``group``: :data:`~unified_mm.vocab.TEXT` (-1) for text positions, else an image
    group; an int for all rows, or a tensor (B,) with one group per row (logits (B, ..., V)), so a
    batch whose rows sit at different places (text / inside an image span) is sampled in one call.
    """
    _check_vocab_size(logits, vocab)
    ids = torch.arange(vocab.size, device=logits.device)
    id_groups = vocab.group_of(ids)  # (V,) TEXT for text/special ids
    group = torch.as_tensor(group, device=logits.device).long()
    if group.numel() and (int(group.min()) < TEXT or int(group.max()) >= vocab.num_groups):
        raise ValueError(f"group must be {TEXT} (text) or in [0, {vocab.num_groups}), "
                         f"got {group.tolist()}")
    if group.dim() == 0:
        allowed = id_groups == group  # (V,)
    elif group.dim() == 1 and logits.dim() >= 2 and group.shape[0] == logits.shape[0]:
        allowed = id_groups[None, :] == group[:, None]  # (B, V)
        allowed = allowed.view(group.shape[0], *([1] * (logits.dim() - 2)), vocab.size)
    else:
        raise ValueError(f"group must be an int or a (B,) tensor matching logits {tuple(logits.shape)}, "
                         f"got shape {tuple(group.shape)}")
    return logits.masked_fill(~allowed, float("-inf"))
