"""Modality-separated softmax: brute-force equality, independence of the other modality's logits,
zero gradient on disallowed ids, per-task sums, and constrained sampling."""
import pytest
import torch

from unified_mm.loss import (TokenLosses, constrain_logits, modality_loss, modality_token_losses,
                             modality_token_losses_from_hidden, per_task_losses, weighted_mean_loss)
from unified_mm.sequence import IGNORE_INDEX
from unified_mm.vocab import TEXT, Vocab

VOCAB = Vocab(text_vocab_size=10, num_groups=2, group_size=2, grid_size=2)  # V = 10 + 2*4 = 18


def make_batch(seed=0, batch=3, length=12):
    """Random logits and labels mixing text targets, image targets of both groups and ignores."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, VOCAB.size, generator=gen) * 3
    labels = torch.randint(0, VOCAB.size, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < 0.3] = IGNORE_INDEX
    labels[0, 1], labels[0, 2], labels[0, 3] = 3, VOCAB.image_start, VOCAB.group_range(1)[0] + 2
    return logits, labels


def allowed_range(target: int) -> tuple[int, int]:
    if target < VOCAB.image_start:
        return 0, VOCAB.image_start
    return VOCAB.group_range((target - VOCAB.image_start) // VOCAB.group_vocab)


def brute_force(logits, labels):
    """Loop over positions: log_softmax over the target's allowed slice, in float64."""
    losses = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            start, end = allowed_range(target)
            log_probs = torch.log_softmax(logits[b, t, start:end].double(), dim=-1)
            losses[b, t] = -log_probs[target - start]
    return losses


def test_equals_brute_force():
    logits, labels = make_batch()
    token_losses = modality_token_losses(logits, labels, VOCAB)
    expected = brute_force(logits, labels)
    assert token_losses.losses.dtype == torch.float32
    assert torch.equal(token_losses.mask, labels[:, 1:] != IGNORE_INDEX)
    assert torch.allclose(token_losses.losses.double(), expected, atol=1e-5)
    assert (token_losses.losses[~token_losses.mask] == 0).all()
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous logits
    assert torch.equal(modality_token_losses(strided, labels, VOCAB).losses, token_losses.losses)
    mean = modality_loss(logits, labels, VOCAB)
    assert torch.allclose(mean.double(), expected.sum() / token_losses.mask.sum(), atol=1e-5)
    # Not the plain full-vocabulary cross-entropy (the separation does something).
    full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert not torch.allclose(mean, full, atol=1e-3)


def test_from_hidden_equals_full_logits_in_value_and_gradient():
    """Logits at labelled positions only: the same losses, and the same gradients for the
    hidden states (zero where nothing is labelled) and the output layer."""
    _, labels = make_batch(seed=3)
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, VOCAB.size, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB.size, 8, generator=gen))
    hidden = torch.randn(*labels.shape, 8, generator=gen)
    results = []
    for full in (True, False):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        if full:
            token_losses = modality_token_losses(head(h), labels, VOCAB)
        else:
            token_losses = modality_token_losses_from_hidden(h, head, labels, VOCAB)
        (token_losses.losses * torch.arange(1.0, labels.shape[1])).sum().backward()
        results.append((token_losses, h.grad.clone(), head.weight.grad.clone()))
    (full_losses, full_dh, full_dw), (sel_losses, sel_dh, sel_dw) = results
    assert torch.equal(sel_losses.mask, full_losses.mask)
    torch.testing.assert_close(sel_losses.losses, full_losses.losses)
    torch.testing.assert_close(sel_dh, full_dh)
    torch.testing.assert_close(sel_dw, full_dw)
    # the last position predicts nothing, nor do positions followed by an ignored label
    assert (sel_dh[:, -1] == 0).all() and (sel_dh[:, :-1][~sel_losses.mask] == 0).all()
    with pytest.raises(ValueError, match="disagree"):
        modality_token_losses_from_hidden(hidden[:, :-1], head, labels, VOCAB)
    with pytest.raises(ValueError, match="vocabulary"):
        modality_token_losses_from_hidden(hidden, torch.nn.Linear(8, VOCAB.size - 1), labels, VOCAB)


def test_bf16_logits_upcast():
    logits, labels = make_batch(seed=1)
    logits = logits.bfloat16()
    token_losses = modality_token_losses(logits, labels, VOCAB)
    assert token_losses.losses.dtype == torch.float32
    assert torch.allclose(token_losses.losses.double(), brute_force(logits.float(), labels), atol=1e-4)
    huge = logits.float() * 0 + 3e4  # large but finite logits stay finite
    assert torch.isfinite(modality_loss(huge.bfloat16(), labels, VOCAB))


def test_image_token_weight_by_hand():
    logits, labels = make_batch(seed=3)
    token_losses = modality_token_losses(logits, labels, VOCAB)
    expected = brute_force(logits, labels)  # (B, T-1) float64, 0 where ignored
    targets = labels[:, 1:]
    image = (targets >= VOCAB.image_start) & (targets != IGNORE_INDEX)
    text = (targets < VOCAB.image_start) & (targets != IGNORE_INDEX)
    assert image.any() and text.any()
    plain = weighted_mean_loss(token_losses, labels, VOCAB, 1.0)
    torch.testing.assert_close(plain, modality_loss(logits, labels, VOCAB))
    text_only = weighted_mean_loss(token_losses, labels, VOCAB, 0.0)
    torch.testing.assert_close(text_only.double(), expected[text].mean(), atol=1e-5, rtol=0)
    quarter = weighted_mean_loss(token_losses, labels, VOCAB, 0.25)
    by_hand = (expected[text].sum() + 0.25 * expected[image].sum()) / (text.sum() + 0.25 * image.sum())
    torch.testing.assert_close(quarter.double(), by_hand, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image_token_weight"):
        weighted_mean_loss(token_losses, labels, VOCAB, -1.0)


def test_other_modality_logits_do_not_matter():
    logits, labels = make_batch(seed=2)
    before = modality_token_losses(logits, labels, VOCAB).losses
    targets = labels[:, 1:]
    is_text = (targets >= 0) & (targets < VOCAB.image_start)
    is_image = targets >= VOCAB.image_start
    noise = torch.randn_like(logits) * 50
    # Perturb the image-id logits: text positions unchanged (bit-exact), image positions change.
    perturbed = logits.clone()
    perturbed[..., VOCAB.image_start:] += noise[..., VOCAB.image_start:]
    after = modality_token_losses(perturbed, labels, VOCAB).losses
    assert torch.equal(after[is_text], before[is_text])
    assert not torch.equal(after[is_image], before[is_image])
    # Perturb text logits and the *other* group's logits: image positions unchanged.
    for group in range(VOCAB.num_groups):
        start, end = VOCAB.group_range(group)
        perturbed = logits.clone() + noise
        perturbed[..., start:end] = logits[..., start:end]
        after = modality_token_losses(perturbed, labels, VOCAB).losses
        in_group = (targets >= start) & (targets < end)
        assert in_group.any()
        assert torch.equal(after[in_group], before[in_group])
        assert not torch.equal(after[is_text], before[is_text])


def test_gradient_of_disallowed_ids_is_exactly_zero():
    logits, labels = make_batch(seed=3)
    logits[0, 0, VOCAB.image_start] = float("inf")  # even inf outside the slice cannot leak in
    logits.requires_grad_(True)
    loss = modality_loss(logits, labels, VOCAB)
    assert torch.isfinite(loss)
    loss.backward()
    grad = logits.grad
    allowed = torch.zeros_like(grad, dtype=torch.bool)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != IGNORE_INDEX:
                start, end = allowed_range(target)
                allowed[b, t, start:end] = True
    assert (grad[~allowed] == 0).all()
    assert (grad[allowed] != 0).all()  # and every allowed logit gets a gradient


def test_nothing_labelled_gives_zero_on_the_graph():
    logits = torch.randn(2, 5, VOCAB.size, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss = modality_loss(logits, labels, VOCAB)
    assert loss.item() == 0
    loss.backward()
    assert (logits.grad == 0).all()


def test_per_task_sums():
    logits, labels = make_batch(seed=4, batch=4)
    token_losses = modality_token_losses(logits, labels, VOCAB)
    task_index = torch.tensor([2, 0, 2, 4])
    sums, counts = per_task_losses(token_losses, task_index, num_tasks=5)
    for task in range(5):
        rows = task_index == task
        assert torch.allclose(sums[task], token_losses.losses[rows].sum())
        assert counts[task] == token_losses.mask[rows].sum()
    assert counts[1] == counts[3] == 0 and sums[1] == 0
    assert torch.allclose(sums.sum() / counts.sum(), modality_loss(logits, labels, VOCAB))
    with pytest.raises(ValueError, match="task_index"):
        per_task_losses(token_losses, torch.tensor([0, 1, 2, 5]), num_tasks=5)


def test_bad_inputs():
    logits, labels = make_batch()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        modality_token_losses(logits, labels.masked_fill(labels == 3, VOCAB.size), VOCAB)
    bad = labels.clone()
    bad[0, 1] = -5
    with pytest.raises(ValueError, match="label -5"):
        modality_token_losses(logits, bad, VOCAB)
    with pytest.raises(ValueError, match="unified vocabulary has 18"):
        modality_loss(torch.randn(3, 12, VOCAB.size + 2), labels, VOCAB)
    with pytest.raises(ValueError, match="group"):
        constrain_logits(torch.randn(2, VOCAB.size), VOCAB.num_groups, VOCAB)


def test_constrain_logits_never_picks_a_disallowed_id():
    gen = torch.Generator().manual_seed(5)
    groups = torch.tensor([TEXT, 0, 1, TEXT, 1, 0])
    logits = torch.randn(len(groups), VOCAB.size, generator=gen)
    logits[:, VOCAB.image_start] = 100.0  # the unconstrained argmax is an image id of group 0
    constrained = constrain_logits(logits, groups, VOCAB)
    ids = torch.arange(VOCAB.size)
    for row, group in enumerate(groups.tolist()):
        allowed = VOCAB.allowed_mask(group)
        assert torch.equal(torch.isfinite(constrained[row]), allowed)
        assert torch.equal(constrained[row][allowed], logits[row][allowed])
        assert allowed[constrained[row].argmax()]
        samples = torch.multinomial(torch.softmax(constrained[row], -1), 500, replacement=True,
                                    generator=gen)
        assert torch.equal(VOCAB.group_of(ids[samples]), torch.full((500,), group))
    # An int group applies to every row; (B, T, V) logits with per-row groups broadcast over T.
    text_only = constrain_logits(logits, TEXT, VOCAB)
    assert (text_only.argmax(-1) < VOCAB.image_start).all()
    three_d = constrain_logits(torch.randn(len(groups), 4, VOCAB.size), groups, VOCAB)
    assert torch.equal(VOCAB.group_of(three_d.argmax(-1)), groups[:, None].expand(-1, 4))
    bf16 = constrain_logits(logits.bfloat16(), groups, VOCAB)
    assert bf16.dtype == torch.bfloat16 and torch.equal(torch.isinf(bf16), torch.isinf(constrained))


def test_returns_token_losses_tuple():
    logits, labels = make_batch()
    result = modality_token_losses(logits, labels, VOCAB)
    assert isinstance(result, TokenLosses) and result.losses.shape == result.mask.shape == (3, 11)
