"""Task templates: loss masks checked by decoding what is labelled, image-span invariants, prompts
equal to training prefixes, truncation rules, validation errors and collation."""
import numpy as np
import pytest
import torch

from mmcore.errors import UserError
from mmcore.text_tokenizer import TextTokenizer, train_sentencepiece
from unified_mm.sequence import (IGNORE_INDEX, TASKS, Sequence, SequenceBuilder, SequenceStats, Turn,
                                 collate)
from unified_mm.vocab import Vocab

CORPUS = [
    "a red circle", "a large blue square in the top left", "what colour is the triangle?", "purple",
    "how many objects are there?", "3", "is there a green cross?", "yes", "no", "red",
    "there is a small yellow circle at the bottom right of the image.", "draw a red circle",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.model"
    train_sentencepiece(CORPUS, path, vocab_size=300)
    return TextTokenizer(path)


@pytest.fixture(scope="module")
def vocab(tok):
    # 2x2 patches, 2 groups of 3 bits: 8 image ids per image, two ranges of 8 ids.
    return Vocab(text_vocab_size=tok.vocab_size, num_groups=2, group_size=3, grid_size=2)


def make_builder(tok, vocab, max_length=256):
    return SequenceBuilder(tok, vocab, max_length=max_length, stats=SequenceStats())


def random_codes(vocab, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab.group_vocab, size=(vocab.num_patches, vocab.num_groups))


def labelled_runs(seq: Sequence) -> list[list[int]]:
    """Contiguous runs of labelled ids (one per assistant turn in chat)."""
    runs, current = [], []
    for token, label in zip(seq.ids, seq.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "labels must equal ids where labelled"
            current.append(label)
    if current:
        runs.append(current)
    return runs


def check_image_spans(seq: Sequence, tok, vocab) -> int:
    """Every <boi> is followed by exactly tokens_per_image ids of the right groups, then <eoi>; no
    image id outside a span. Returns the number of spans."""
    ids = torch.tensor(seq.ids)
    assert len(seq.ids) == len(seq.labels)
    boi = (ids == tok.boi_id).nonzero().flatten().tolist()
    assert len(boi) == int((ids == tok.eoi_id).sum())
    inside = torch.zeros(len(ids), dtype=torch.bool)
    for start in boi:
        span = ids[start + 1: start + 1 + vocab.tokens_per_image]
        assert len(span) == vocab.tokens_per_image
        expected_groups = torch.arange(vocab.tokens_per_image) % vocab.num_groups
        assert torch.equal(vocab.group_of(span), expected_groups)
        assert int(ids[start + 1 + vocab.tokens_per_image]) == tok.eoi_id
        inside[start + 1: start + 1 + vocab.tokens_per_image] = True
    assert not vocab.is_image(ids[~inside]).any(), "image id outside an image span"
    return len(boi)


def test_vqa_labels_exactly_the_answer(tok, vocab):
    builder = make_builder(tok, vocab)
    codes = random_codes(vocab, 0)
    seq = builder.understanding(codes, "what colour is the triangle?", "purple")
    assert seq.task == "vqa" and seq.ids[0] == tok.bos_id
    runs = labelled_runs(seq)
    assert len(runs) == 1
    assert tok.decode(runs[0], skip_special=False) == "purple<eos>"
    assert check_image_spans(seq, tok, vocab) == 1
    # The image comes at the start of the user turn.
    assert seq.ids[:3] == [tok.bos_id, tok.user_id, tok.boi_id]
    span = seq.ids[3: 3 + vocab.tokens_per_image]
    assert torch.equal(vocab.ids_to_codes(torch.tensor(span)), torch.as_tensor(codes))
    after_image = seq.ids[3 + vocab.tokens_per_image:]
    expected = "<eoi>what colour is the triangle?<assistant>purple<eos>"
    assert tok.decode(after_image, skip_special=False) == expected


def test_multi_turn_chat_labels_each_answer(tok, vocab):
    builder = make_builder(tok, vocab)
    codes_in, codes_out = random_codes(vocab, 1), random_codes(vocab, 2)
    turns = [Turn("user", "what colour is the triangle?", codes_in), Turn("assistant", "purple"),
             Turn("user", "how many objects are there?"), Turn("assistant", "3"),
             Turn("user", "draw a red circle"), Turn("assistant", image_codes=codes_out)]
    seq = builder.chat(turns)
    assert seq.task == "chat"
    assert check_image_spans(seq, tok, vocab) == 2
    runs = labelled_runs(seq)
    assert [tok.decode(r, skip_special=False) for r in runs[:2]] == ["purple<eos>", "3<eos>"]
    image_run = runs[2]  # <boi> (the model starts the image itself) + image ids + <eoi> + <eos>
    assert image_run[0] == tok.boi_id and image_run[-2:] == [tok.eoi_id, tok.eos_id]
    assert torch.equal(vocab.ids_to_codes(torch.tensor(image_run[1:-2])), torch.as_tensor(codes_out))
    # The input image is never labelled.
    answers = len(tok.encode("purple")) + len(tok.encode("3"))
    assert sum(len(r) for r in runs) == answers + 2 + 1 + vocab.tokens_per_image + 2


def test_t2i_labels_image_eoi_eos_and_prompt_is_prefix(tok, vocab):
    builder = make_builder(tok, vocab)
    codes = torch.as_tensor(random_codes(vocab, 3))  # torch codes accepted too
    caption = "a large blue square in the top left"
    seq = builder.generation(caption, codes)
    assert seq.task == "t2i" and check_image_spans(seq, tok, vocab) == 1
    prompt = builder.generation_prompt(caption)
    assert seq.ids[: len(prompt)] == prompt and prompt[-2:] == [tok.assistant_id, tok.boi_id]
    # the prompt is unlabelled except its final <boi> (labelled so chat models learn to open images)
    assert all(label == IGNORE_INDEX for label in seq.labels[: len(prompt) - 1])
    assert seq.labels[len(prompt) - 1] == tok.boi_id
    labelled = seq.labels[len(prompt):]
    assert labelled == seq.ids[len(prompt):]
    assert labelled[-2:] == [tok.eoi_id, tok.eos_id]
    assert torch.equal(vocab.ids_to_codes(torch.tensor(labelled[:-2])), codes.long())
    assert tok.decode(prompt) == caption


def test_caption_dropout_is_the_unconditional_prompt(tok, vocab):
    builder = make_builder(tok, vocab)
    codes = random_codes(vocab, 4)
    unconditional = builder.generation_prompt("")
    assert unconditional == [tok.bos_id, tok.user_id, tok.assistant_id, tok.boi_id]
    dropped = builder.generation("a red circle", codes, drop_caption=True)
    assert dropped.ids == [*unconditional, *builder.image_ids(codes), tok.eoi_id, tok.eos_id]
    assert dropped.labels[len(unconditional):] == dropped.ids[len(unconditional):]


def test_chat_prompt_is_the_training_prefix(tok, vocab):
    builder = make_builder(tok, vocab)
    history = [Turn("user", "what colour is the triangle?", random_codes(vocab, 5)),
               Turn("assistant", "purple"), Turn("user", "is there a green cross?")]
    prompt = builder.chat_prompt(history)
    seq = builder.chat([*history, Turn("assistant", "no")])
    assert seq.ids[: len(prompt)] == prompt and prompt[-1] == tok.assistant_id
    # The first token the model must produce after the prompt is labelled: it is the answer.
    assert seq.labels[len(prompt)] == seq.ids[len(prompt)] == tok.encode("no")[0]
    assert builder.chat_prompt(history[:1]) == builder.understanding(
        history[0].image_codes, history[0].text, "purple").ids[: len(builder.chat_prompt(history[:1]))]


def test_text_only_labels_everything_after_bos(tok, vocab):
    seq = make_builder(tok, vocab).text_only("there is a small yellow circle")
    assert seq.task == "text" and seq.ids[0] == tok.bos_id and seq.ids[-1] == tok.eos_id
    assert seq.labels[0] == IGNORE_INDEX and seq.labels[1:] == seq.ids[1:]
    assert tok.decode(seq.labels[1:]) == "there is a small yellow circle"


def test_text_truncation(tok, vocab):
    builder = make_builder(tok, vocab, max_length=6)
    text = "there is a small yellow circle at the bottom right of the image."
    seq = builder.text_only(text)
    assert len(seq.ids) == 6 and seq.ids[0] == tok.bos_id and seq.ids[1:] == tok.encode(text)[:5]
    assert builder.stats.count("text_truncated") == 1
    assert builder.text_only("no").ids[-1] == tok.eos_id  # short text untouched, not counted
    assert builder.stats.count("text_truncated") == 1


def test_chat_drops_trailing_pairs_or_skips(tok, vocab):
    pair = [Turn("user", "how many objects are there?"), Turn("assistant", "3")]
    first = make_builder(tok, vocab).chat(pair)
    builder = make_builder(tok, vocab, max_length=len(first.ids) + 3)  # room for pair 1 only
    seq = builder.chat([*pair, Turn("user", "is there a green cross?"), Turn("assistant", "yes"), *pair])
    assert seq == first
    assert builder.stats.count("turns_dropped") == 1 and builder.stats.count("too_long") == 0
    tight = make_builder(tok, vocab, max_length=len(first.ids) - 1)
    assert tight.chat(pair) is None
    assert tight.understanding(random_codes(vocab, 6), pair[0].text, pair[1].text) is None
    assert tight.stats.summary() == {"too_long": 2}


def test_generation_cuts_caption_or_skips(tok, vocab):
    codes = random_codes(vocab, 7)
    caption = "there is a small yellow circle at the bottom right of the image."
    overhead = 6 + vocab.tokens_per_image
    builder = make_builder(tok, vocab, max_length=overhead + 3)
    seq = builder.generation(caption, codes)
    assert len(seq.ids) == overhead + 3 and check_image_spans(seq, tok, vocab) == 1
    prompt = builder.generation_prompt(caption)  # cut the same way
    assert seq.ids[: len(prompt)] == prompt and prompt[2:5] == tok.encode(caption)[:3]
    assert builder.stats.count("caption_truncated") == 1  # prompts are not counted
    small = make_builder(tok, vocab, max_length=overhead - 1)
    assert small.generation("", codes) is None and small.stats.count("too_long") == 1
    with pytest.raises(UserError, match="cannot hold an image"):
        small.generation_prompt("")


def test_stats_merge_and_summary():
    a, b = SequenceStats(), SequenceStats()
    a.add("too_long")
    b.add("too_long", 2)
    b.add("caption_truncated")
    assert a.merge(b) is a
    assert a.summary() == {"caption_truncated": 1, "too_long": 3} and a.count("other") == 0


def test_validation_errors(tok, vocab):
    builder = make_builder(tok, vocab)
    with pytest.raises(UserError, match="unknown task 'vq'.*vqa, caption, chat, t2i, text"):
        builder.understanding(None, "q", "a", task="vq")
    with pytest.raises(UserError, match="expected role 'user'"):
        builder.chat([Turn("assistant", "hi"), Turn("user", "hi")])
    with pytest.raises(UserError, match="turn 1: expected role 'assistant'"):
        builder.chat([Turn("user", "a"), Turn("user", "b")])
    with pytest.raises(UserError, match="unknown role"):
        builder.chat([Turn("system", "a"), Turn("assistant", "b")])
    with pytest.raises(UserError, match="last turn must have role 'assistant'"):
        builder.chat([Turn("user", "a")])
    with pytest.raises(UserError, match="last turn must have role 'user'"):
        builder.chat_prompt([Turn("user", "a"), Turn("assistant", "b")])
    with pytest.raises(ValueError, match=r"shape \(4, 2\).*got \(4, 3\)"):
        builder.understanding(np.zeros((4, 3), dtype=np.int64), "q", "a")
    with pytest.raises(ValueError, match=r"got \(8,\)"):
        builder.generation("a", np.zeros(8, dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        builder.generation("a", np.full((4, 2), 8))
    with pytest.raises(ValueError, match="assistant turn needs"):
        builder.understanding(None, "q", "")
    with pytest.raises(UserError, match="does not match"):
        SequenceBuilder(tok, Vocab(tok.vocab_size + 1, 2, 3, 2), max_length=10)


def test_collate_pads_right(tok, vocab):
    builder = make_builder(tok, vocab)
    seqs = [builder.text_only("a red circle"),
            builder.understanding(random_codes(vocab, 8), "what colour is the triangle?", "purple",
                                  task="caption")]
    batch = collate(seqs, pad_id=tok.pad_id)
    lengths = [len(s.ids) for s in seqs]
    assert batch.ids.shape == batch.labels.shape == batch.attention_mask.shape == (2, max(lengths))
    assert batch.task_index.tolist() == [TASKS.index("text"), TASKS.index("caption")]
    for row, seq in enumerate(seqs):
        n = len(seq.ids)
        assert batch.ids[row, :n].tolist() == seq.ids and batch.labels[row, :n].tolist() == seq.labels
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.ids.shape[1] - n)
        assert (batch.ids[row, n:] == tok.pad_id).all() and (batch.labels[row, n:] == IGNORE_INDEX).all()
    with pytest.raises(UserError, match="unknown task"):
        collate([Sequence([1, 2], [IGNORE_INDEX, 2], "nope")], pad_id=0)
