"""The unified vocabulary: id layout, code/bit/id round trips, and regrouping the tokenizer's codes
into the decoder's own image-id groups (one id per patch instead of two)."""
import pytest
import torch

from mmcore.errors import UserError
from tokenizer.bsq import group_indices_to_bits
from unified_mm.vocab import TEXT, Vocab

TWO = Vocab.for_tokenizers(20, 6, 3, 2)  # the tokenizer's layout: 2 ids of 3 bits per patch
ONE = Vocab.for_tokenizers(20, 6, 3, 2, image_group_size=6)  # one id of 6 bits per patch


def random_codes(seed=0, batch=4):
    """Tokenizer codes (B, 4 patches, 2 groups) in [0, 8)."""
    return torch.randint(0, 8, (batch, 4, 2), generator=torch.Generator().manual_seed(seed))


def test_layouts():
    assert (TWO.num_groups, TWO.group_size, TWO.code_groups, TWO.regroups) == (2, 3, 2, False)
    assert (ONE.num_groups, ONE.group_size, ONE.code_groups, ONE.regroups) == (1, 6, 2, True)
    assert (TWO.size, ONE.size) == (20 + 2 * 8, 20 + 64)
    assert (TWO.tokens_per_image, ONE.tokens_per_image) == (8, 4)
    assert Vocab.for_tokenizers(20, 6, 3, 2, image_group_size=3) == TWO  # 0 or the same: no regrouping


@pytest.mark.parametrize("vocab", [TWO, ONE], ids=["own-groups", "one-id-per-patch"])
def test_codes_ids_bits_round_trip(vocab):
    codes = random_codes()
    ids = vocab.codes_to_ids(codes)  # (B, N·G)
    assert ids.shape == (4, vocab.tokens_per_image)
    assert vocab.is_image(ids).all()
    # offset j of a span is an id of group j mod G
    groups = vocab.group_of(ids)
    assert torch.equal(groups, (torch.arange(vocab.tokens_per_image) % vocab.num_groups).expand_as(groups))
    assert torch.equal(vocab.ids_to_codes(ids), codes)
    bits = group_indices_to_bits(codes, 3)  # (B, N, 6): the tokenizer's bits, MSB first
    assert torch.equal(vocab.bits_to_ids(bits), ids)
    assert torch.equal(vocab.ids_to_bits(ids), bits)


def test_one_id_per_patch_is_the_patch_code_msb_first():
    codes = torch.tensor([[[5, 2], [0, 7], [7, 0], [1, 1]]])  # (1, 4, 2)
    ids = ONE.codes_to_ids(codes)
    # the 6 bits read as one number, the first group most significant: 5·8 + 2, ...
    assert (ids - ONE.image_start).tolist() == [[42, 7, 56, 9]]
    # the sampler's own-group indices map straight to ids
    assert torch.equal(ONE.group_indices_to_ids(torch.tensor([[[42], [7], [56], [9]]])), ids)
    assert ONE.group_of(ids).unique().tolist() == [0]


def test_bad_codes_and_ids_are_named():
    with pytest.raises(ValueError, match=r"shape \(\.\.\., N, 2\)"):
        ONE.codes_to_ids(torch.zeros(4, 1, dtype=torch.long))  # codes come in the tokenizer's grouping
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        ONE.codes_to_ids(torch.full((4, 2), 8))
    with pytest.raises(ValueError, match="not an id of group 0"):
        ONE.ids_to_codes(torch.tensor([ONE.image_start, 3, ONE.image_start, ONE.image_start]))
    assert ONE.group_of(torch.tensor([3])).item() == TEXT
    with pytest.raises(UserError, match="does not divide"):
        Vocab.for_tokenizers(20, 6, 3, 2, image_group_size=4)
    with pytest.raises(UserError, match="code_group_size"):
        Vocab(20, 1, 6, 2, code_group_size=-1)
    with pytest.raises(UserError, match="tokenizer's groups of 4"):
        Vocab(20, 1, 6, 2, code_group_size=4)


def test_serialisation_round_trips_and_accepts_older_exports():
    for vocab in (TWO, ONE):
        assert Vocab.from_dict(vocab.to_dict()) == vocab
    older = {"text_vocab_size": 20, "num_groups": 2, "group_size": 3, "grid_size": 2}  # before code_group_size
    assert Vocab.from_dict(older) == TWO
    with pytest.raises(UserError, match="expected keys"):
        Vocab.from_dict({**older, "colour": 1})
    with pytest.raises(UserError, match="expected keys"):
        Vocab.from_dict({"text_vocab_size": 20})
