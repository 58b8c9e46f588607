"""Mixed-task stream: schedule, determinism, resume position, task/sample matching."""
import random

import pytest

from mmcore.config import ConfigError
from mmcore.errors import UserError
from mmcore.text_tokenizer import TextTokenizer
from tokenizer.export import tokenizer_hash
from unified_mm.data.mixture import (UNCONDITIONAL_T2I, MixedTaskStream, MixtureConfig, SourceConfig,
                                     build_sequence, eval_sequences, sample_tasks, text_gain, weights_at)
from unified_mm.sequence import IGNORE_INDEX, TASKS, SequenceBuilder, SequenceStats
from unified_mm.tokenizer_cli import read_manifest
from unified_mm.vocab import Vocab
from tests.unified_env import make_unified_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    paths = make_unified_env(tmp_path_factory.mktemp("mixture"))
    tok = TextTokenizer(paths["text_model"])
    manifest = read_manifest(paths["codes"])
    vocab = Vocab.for_tokenizers(tok.vocab_size, manifest["num_bits"], manifest["group_size"], manifest["grid_size"])
    return paths, tok, vocab, tokenizer_hash(paths["tokenizer"])


def stream(env, state=None, cfg=None, **kw):
    paths, tok, vocab, hash_ = env
    builder = SequenceBuilder(tok, vocab, 192, SequenceStats())
    return MixedTaskStream([SourceConfig(codes=str(paths["codes"]))], cfg or MixtureConfig(), builder,
                           tokenizer_hash=hash_, total_steps=100, seed=3, rank=0, shuffle_buffer=8,
                           state=state, **kw)


def test_weights_move_linearly_from_start_to_end():
    cfg = MixtureConfig(start={"text": 60, "caption": 1, "t2i": 3}, end={"text": 12, "caption": 1, "t2i": 3})
    assert weights_at(cfg, 0, 101)["text"] == 60 and weights_at(cfg, 100, 101)["text"] == 12
    assert weights_at(cfg, 50, 101)["text"] == pytest.approx(36)
    assert weights_at(cfg, 50, 101)["vqa"] == 0
    constant = MixtureConfig(start={"vqa": 1})
    assert weights_at(constant, 0, 10) == weights_at(constant, 9, 10)


def test_bad_mixture_config_is_an_error():
    with pytest.raises(ConfigError, match="unknown task 'ocr'"):
        MixtureConfig(start={"ocr": 1.0}).validate()
    with pytest.raises(ConfigError, match="at least one task"):
        MixtureConfig(start={"vqa": 0.0}).validate()


def test_stream_is_deterministic_and_resumes_exactly(env):
    first = stream(env)
    head = [first.next_sequence(step // 4) for step in range(12)]
    state = first.state()
    tail = [first.next_sequence(3 + step // 4) for step in range(12)]
    again = stream(env)
    assert [again.next_sequence(step // 4) for step in range(12)] == head
    resumed = stream(env, state=state)
    assert [resumed.next_sequence(3 + step // 4) for step in range(12)] == tail
    assert state["sequences"] == 12 and sum(state["read"]) >= 12


def test_tasks_follow_the_weights(env):
    only_t2i = stream(env, cfg=MixtureConfig(start={"t2i": 1.0}, caption_dropout=0.0))
    assert {only_t2i.next_sequence(0).task for _ in range(10)} == {"t2i"}
    mixed = stream(env, cfg=MixtureConfig(start={"vqa": 1.0, "text": 1.0}))
    tasks = [mixed.next_sequence(0).task for _ in range(60)]
    assert set(tasks) == {"vqa", "text"} and 15 < tasks.count("vqa") < 45


def test_every_task_builds_a_labelled_sequence(env):
    paths, tok, vocab, hash_ = env
    builder = SequenceBuilder(tok, vocab, 192)
    held_out = eval_sequences(SourceConfig(codes=str(paths["codes"]), split="val"), MixtureConfig(), builder,
                              tokenizer_hash=hash_, per_task=3)
    assert set(held_out) == set(TASKS) | {UNCONDITIONAL_T2I}
    for task, sequences in held_out.items():
        assert len(sequences) == 3
        for seq in sequences:
            assert seq.task == task.replace(UNCONDITIONAL_T2I, "t2i")
            assert any(label != IGNORE_INDEX for label in seq.labels)
    again = eval_sequences(SourceConfig(codes=str(paths["codes"]), split="val"), MixtureConfig(), builder,
                           tokenizer_hash=hash_, per_task=3)
    assert again == held_out


def test_unconditional_t2i_is_the_same_image_after_an_empty_caption(env):
    paths, tok, vocab, hash_ = env
    builder = SequenceBuilder(tok, vocab, 192)
    held_out = eval_sequences(SourceConfig(codes=str(paths["codes"]), split="val"), MixtureConfig(), builder,
                              tokenizer_hash=hash_, per_task=3)
    for conditional, unconditional in zip(held_out["t2i"], held_out[UNCONDITIONAL_T2I]):
        # the prompt: <bos> <user> <assistant> <boi>, nothing of the caption
        assert unconditional.ids[:4] == [tok.bos_id, tok.user_id, tok.assistant_id, tok.boi_id]
        assert len(conditional.ids) > len(unconditional.ids)
        # the scored part (<boi>, image ids, <eoi>, <eos>) is the same
        scored = [label for label in conditional.labels if label != IGNORE_INDEX]
        assert scored == [label for label in unconditional.labels if label != IGNORE_INDEX]
        assert len(scored) == vocab.tokens_per_image + 3
    # per sequence: the mean difference times the scored ids of one image
    assert text_gain({"t2i": 0.5, UNCONDITIONAL_T2I: 0.75}, held_out) == 0.25 * (vocab.tokens_per_image + 3)
    assert text_gain({"vqa": 0.5}, held_out) is None


def test_sample_tasks_and_unservable_task():
    assert sample_tasks({"qa": [{"question": "q", "answer": "a"}]}) == {"vqa", "chat"}
    assert sample_tasks({"captions": ["a red circle"]}) == {"caption", "t2i", "text"}
    assert sample_tasks({"conversations": [{"role": "user", "text": "hi"}]}) == {"chat"}
    assert sample_tasks({"captions": [""], "qa": []}) == set()


def test_source_without_the_task_and_wrong_hash_are_clear_errors(env):
    paths, tok, vocab, hash_ = env
    builder = SequenceBuilder(tok, vocab, 192)
    no_t2i = MixedTaskStream([SourceConfig(codes=str(paths["codes"]), tasks=["vqa"])], MixtureConfig(start={"t2i": 1}),
                             builder, tokenizer_hash=hash_, total_steps=10, seed=0, rank=0)
    with pytest.raises(UserError, match="no source lists it"):
        no_t2i.next_sequence(0)
    with pytest.raises(UserError, match="expected 0000"):
        stream((paths, tok, vocab, "0000"))


def test_llava_style_conversation_becomes_chat(env):
    paths, tok, vocab, _ = env
    builder = SequenceBuilder(tok, vocab, 192)
    import numpy as np
    codes = np.zeros((vocab.num_patches, vocab.num_groups), dtype=np.int64)
    meta = {"conversations": [{"role": "user", "text": "What is it?"}, {"role": "assistant", "text": "a red circle"},
                              {"role": "user", "text": "How many?"}, {"role": "assistant", "text": "1"}],
            "image_turn": 0}
    seq = build_sequence("chat", codes, meta, random.Random(0), MixtureConfig(), builder)
    labelled = [i for i, label in zip(seq.ids, seq.labels) if label != IGNORE_INDEX]
    assert tok.decode(labelled, skip_special=False) == "a red circle<eos>1<eos>"
    assert seq.ids.count(tok.boi_id) == 1


def test_caption_gain_equals_per_image_loss_differences(env):
    """quick_eval.caption_gain (batched, padded) against one unbatched forward per sequence."""
    import torch

    from unified_mm.loss import modality_token_losses
    from unified_mm.model import UnifiedModelConfig, build_model
    from unified_mm.quick_eval import caption_gain
    from unified_mm.sequence import collate
    from unified_mm.tokenizer_cli import read_precomputed
    paths, tok, vocab, hash_ = env
    builder = SequenceBuilder(tok, vocab, 192)
    torch.manual_seed(0)
    model = build_model(UnifiedModelConfig(overrides={"num_hidden_layers": 1}), vocab).eval()
    samples = [(meta["captions"][i % 2], codes) for i, (_, codes, meta)
               in zip(range(3), read_precomputed(paths["codes"], "val", hash_, split_by_rank=False))]

    def sequence_loss(caption, codes):
        batch = collate([builder.generation(caption, codes)], tok.pad_id)
        with torch.no_grad():
            logits = model(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
        return float(modality_token_losses(logits, batch.labels, vocab).losses.sum())

    direct = sum(sequence_loss("", codes) - sequence_loss(caption, codes) for caption, codes in samples) / 3
    gain = caption_gain(model, builder, samples, pad_id=tok.pad_id, batch_size=2)
    assert gain == pytest.approx(direct, rel=1e-4, abs=1e-4) and abs(gain) > 1e-3
    assert caption_gain(model, builder, [("", codes) for _, codes in samples], pad_id=tok.pad_id) == 0.0
    assert caption_gain(model, builder, [], pad_id=tok.pad_id) is None
