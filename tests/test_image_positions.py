"""Image position embeddings: span offsets counted from ids (whole or in chunks), what is added
where, and that an exported model with them reloads to identical logits."""
import json

import torch

from sampling_env import make_export
from unified_mm.export import load_unified
from unified_mm.image_positions import ImagePositionEmbedding, image_position_embedding, span_offsets
from unified_mm.model import UnifiedModelConfig, build_model, special_token_ids
from unified_mm.vocab import Vocab

VOCAB = Vocab(text_vocab_size=40, num_groups=2, group_size=3, grid_size=2)  # 8 image ids per image
SPECIALS = special_token_ids(VOCAB)
BOI, EOI = SPECIALS["<boi>"], SPECIALS["<eoi>"]


def image(seed: int) -> list[int]:
    codes = torch.randint(0, VOCAB.group_vocab, (VOCAB.num_patches, VOCAB.num_groups),
                          generator=torch.Generator().manual_seed(seed))
    return VOCAB.codes_to_ids(codes).tolist()  # (h*w*G,) ids, group k at offsets k, k+G, ...


def two_image_sequence() -> list[int]:
    return [3, 4, BOI, *image(0), EOI, 5, 6, 7, BOI, *image(1), EOI, 8]


def test_offsets_count_each_span_from_zero_and_mark_everything_else():
    ids = torch.tensor([two_image_sequence()])
    result = span_offsets(ids, VOCAB, BOI)
    n = VOCAB.tokens_per_image
    expected = [-1, -1, -1, *range(n), -1, -1, -1, -1, -1, *range(n), -1, -1]
    assert result.offsets[0].tolist() == expected
    assert result.next_offset.tolist() == [n]  # no new <boi>: a further image id would continue the span


def test_offsets_of_chunks_fed_one_after_another_equal_the_whole():
    """The decoder feeds a sequence in pieces (prefill, then 1 or k ids per step) and carries
    next_offset between them; that must reproduce the offsets of the whole sequence."""
    sequence = two_image_sequence()
    whole = span_offsets(torch.tensor([sequence]), VOCAB, BOI).offsets[0].tolist()
    for cuts in ([4], [3, 4, 5, 11], list(range(1, len(sequence)))):
        pieces, start, previous = [], torch.zeros(1, dtype=torch.long), 0
        for cut in [*cuts, len(sequence)]:
            chunk = span_offsets(torch.tensor([sequence[previous:cut]]), VOCAB, BOI, start)
            pieces += chunk.offsets[0].tolist()
            start, previous = chunk.next_offset, cut
        assert pieces == whole, cuts


def test_places_are_added_at_image_ids_only():
    torch.manual_seed(0)
    base = torch.nn.Embedding(VOCAB.size, 8)
    places = ImagePositionEmbedding(base, VOCAB, BOI, std=0.5)
    assert places.weight is base.weight
    ids = torch.tensor([two_image_sequence()])
    out = places(ids)[0]
    plain = base(ids)[0]
    offsets = span_offsets(ids, VOCAB, BOI).offsets[0]
    for t in range(ids.shape[1]):
        offset = int(offsets[t])
        if offset < 0:
            assert torch.equal(out[t], plain[t])
            continue
        patch, group = divmod(offset, VOCAB.num_groups)
        row, col = divmod(patch, VOCAB.grid_size)
        expected = plain[t] + places.row.weight[row] + places.col.weight[col] + places.group.weight[group]
        torch.testing.assert_close(out[t], expected)
    # the same id in another place gets another input vector
    first = VOCAB.codes_to_ids(torch.zeros(VOCAB.num_patches, VOCAB.num_groups, dtype=torch.long))  # code 0
    again = places(torch.tensor([[BOI, *first.tolist()]]))[0, 1:]
    assert len({tuple(v.tolist()) for v in again}) == VOCAB.tokens_per_image  # all distinct


def test_build_model_flags_the_config_and_keeps_plain_models_plain():
    with_places = build_model(UnifiedModelConfig(image_positions=True), VOCAB)
    assert image_position_embedding(with_places) is not None and with_places.config.image_position_embedding
    assert image_position_embedding(build_model(UnifiedModelConfig(), VOCAB)) is None


def test_export_with_places_reloads_to_identical_logits(tmp_path):
    export = make_export(tmp_path, image_positions=True)
    assert json.loads((export / "config.json").read_text())["image_position_embedding"] is True
    loaded = load_unified(export)
    places = image_position_embedding(loaded.model)
    assert places is not None
    text = loaded.text_tokenizer
    codes = torch.zeros(loaded.vocab.num_patches, loaded.vocab.num_groups, dtype=torch.long)  # (N, G)
    ids = torch.tensor([[text.bos_id, text.boi_id, *loaded.vocab.codes_to_ids(codes).tolist()]])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
        again = load_unified(export).model(input_ids=ids).logits
        # and the places matter: the same ids without them give other logits
        plain = loaded.model(inputs_embeds=torch.nn.functional.embedding(ids, places.weight)).logits
    assert torch.equal(logits, again)
    assert not torch.allclose(logits[0, 2:], plain[0, 2:])
