"""Text tokenizer: round trips, special-token layout, loading foreign (Llama-style) models, errors."""
import io

import pytest
import sentencepiece as spm

from mmcore.errors import UserError
from mmcore.text_tokenizer import SPECIALS, TextTokenizer, train_sentencepiece

CORPUS = [
    "a red circle", "a large blue square in the top left", "what colour is the triangle?", "purple",
    "how many objects are there?", "3", "is there a green cross?", "yes", "no",
    "there is a small yellow circle at the bottom right of the image.",
] * 50


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.model"
    train_sentencepiece(CORPUS, path, vocab_size=400)
    return TextTokenizer(path)


@pytest.mark.parametrize("text", [
    "a red circle", "what colour is the triangle?", " leading and  double spaces ", "Ünïcödé 日本語 🙂",
    "tabs\tand\nnewlines", "numbers 12345 and punctuation !?.,;:'\"", "",
])
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.n_text for i in ids)
    assert tokenizer.decode(ids) == text


def test_dataset_words_are_compact(tokenizer):
    # The corpus' own words must not fall back to bytes: a short caption is a few pieces.
    assert len(tokenizer.encode("a red circle")) <= 4


def test_special_layout(tokenizer):
    assert tokenizer.vocab_size == tokenizer.n_text + len(SPECIALS)
    assert sorted(tokenizer.special_ids.values()) == list(range(tokenizer.n_text, tokenizer.vocab_size))
    assert tokenizer.bos_id == tokenizer.special("<bos>") and tokenizer.boi_id == tokenizer.special("<boi>")
    ids = [tokenizer.bos_id, *tokenizer.encode("a red circle"), tokenizer.eos_id]
    assert tokenizer.decode(ids) == "a red circle"
    assert tokenizer.decode(ids, skip_special=False) == "<bos>a red circle<eos>"
    with pytest.raises(ValueError, match="not a text or special id"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(UserError, match="unknown special token"):
        tokenizer.special("<image>")


def test_loads_llama_style_model(tmp_path):
    """A model with its own <s>/</s> (Llama layout: unk=0, bos=1, eos=2) keeps them as text pieces;
    our specials still come after the whole sentencepiece vocabulary."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    tok = TextTokenizer(path)
    assert tok.sp.bos_id() == 1 and tok.bos_id == tok.n_text + SPECIALS.index("<bos>")
    assert tok.decode(tok.encode("a red circle")) == "a red circle"


def test_bad_model_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        TextTokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(UserError, match="junk.model"):
        TextTokenizer(junk)
    with pytest.raises(UserError, match="empty corpus"):
        train_sentencepiece(["", ""], tmp_path / "x.model")
    assert not (tmp_path / "x.model").exists()


def test_encode_pooled_always_ends_with_eos(tokenizer):
    ids = tokenizer.encode_pooled("a red circle", context_length=64)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == "a red circle"
    long = tokenizer.encode_pooled("a large blue square in the top left " * 10, context_length=8)
    assert len(long) == 8 and long[-1] == tokenizer.eos_id
