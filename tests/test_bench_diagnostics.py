"""bench/yesno_probe.py and bench/unified_budget.py's QuestionLabelBuilder and yes/no scaffold: the
diagnostics measure what they say (probe rows and their truth, the AUC, which tokens a bench builder
labels, what a scaffolded chat asks and answers)."""
import numpy as np
import torch

from unified_mm.sequence import IGNORE_INDEX, Turn

from tests.script_env import load_script
from tests.test_sequence import make_builder, tok, vocab  # noqa: F401 (fixtures)

probe = load_script("bench/yesno_probe.py", "yesno_probe")
budget = load_script("bench/unified_budget.py", "unified_budget")


def test_probe_rows_ask_every_colour_once_per_object_and_say_yes_only_to_its_own():
    meta = {"objects": [{"position": "top left", "colour": "red"}, {"position": "bottom", "colour": "blue"}]}
    rows = probe.prompts_for(meta, ["blue", "green", "red"])
    yesno = [r for r in rows if r["kind"] == "yesno"]
    assert len(yesno) == 6 and len(rows) == 8
    assert [r["answer"] for r in yesno] == [0, 0, 1, 1, 0, 0]
    assert yesno[2]["question"] == "Is the object in the top left red?"
    assert {r["question"] for r in rows if r["kind"] == "colour"} == {
        "What colour is the object in the top left?", "What colour is the object at the bottom?"}


def test_auc_of_perfect_reversed_and_tied_scores():
    truth = torch.tensor([0, 0, 1, 1])
    assert probe.auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), truth) == 1.0
    assert probe.auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), truth) == 0.0
    assert probe.auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), truth) == 0.5
    assert probe.auc(torch.tensor([0.1, 0.6, 0.5, 0.9]), truth) == 0.75  # one of four pairs wrong


def test_probe_reads_a_linear_label_and_not_a_random_one():
    torch.manual_seed(0)
    x = torch.randn(400, 8)
    train = torch.arange(400) % 2 == 0
    readable = ["a" if v > 0 else "b" for v in x[:, 3].tolist()]
    random_labels = ["a" if v else "b" for v in (torch.rand(400) > 0.5).tolist()]
    assert probe.probe_accuracy(x, readable, train) > 0.95
    assert probe.probe_accuracy(x, random_labels, train) < 0.65


def test_question_label_builder_labels_questions_in_chats_but_not_captions(tok, vocab):  # noqa: F811
    builder = budget.QuestionLabelBuilder(tok, vocab, 192)
    codes = np.zeros((vocab.num_patches, vocab.code_groups), np.int64)
    seq = builder.chat([Turn("user", "is it red", codes), Turn("assistant", "yes"),
                        Turn("user", "what shape"), Turn("assistant", "circle")], task="vqa")
    labelled = [i for i, label in zip(seq.ids, seq.labels) if label != IGNORE_INDEX]
    expected = [*tok.encode("is it red"), *tok.encode("yes"), tok.eos_id,
                *tok.encode("what shape"), *tok.encode("circle"), tok.eos_id]
    assert labelled == expected  # no image ids, specials or <assistant>
    generated = builder.generation("a red circle", codes)
    caption_ids = set(tok.encode("a red circle"))
    assert not any(label in caption_ids for label in generated.labels)
    plain = make_builder(tok, vocab).understanding(codes, "is it red", "yes")
    with_question = builder.understanding(codes, "is it red", "yes")
    assert plain.ids == with_question.ids  # the same sequence, only more of it labelled
    assert [i for i in plain.labels if i != IGNORE_INDEX] == [*tok.encode("yes"), tok.eos_id]


def test_yesno_scaffold_opens_chats_with_a_colour_question_then_a_true_yes_no(tok, vocab, monkeypatch):  # noqa: F811
    import random

    from unified_mm.data import mixture

    monkeypatch.setattr(mixture, "build_sequence", mixture.build_sequence)  # restored after the test
    budget.use_yesno_scaffold(1.0)
    meta = {"objects": [{"position": "left", "colour": "red"}, {"position": "top", "colour": "blue"}],
            "qa": [{"question": "How many objects are there?", "answer": "2"}]}
    codes = np.zeros((vocab.num_patches, vocab.code_groups), np.int64)
    answers = {}
    for seed in range(40):
        seq = mixture.build_sequence("chat", codes, meta, random.Random(seed), mixture.MixtureConfig(chat_turns=5),
                                     make_builder(tok, vocab))
        text = tok.decode([i for i in seq.ids if i < vocab.image_start])
        colour = "red" if "on the left" in text.split("?")[0] else "blue"
        asked = text.split("?")[1].split()[-1]  # "<colour>Is the object <place> <asked>"
        answers[seed] = (asked == colour, text)
        assert text.startswith(f"What colour is the object {'on the left' if colour == 'red' else 'at the top'}?{colour}")
        assert ("?yes" in text) == (asked == colour) and ("?no" in text) != (asked == colour)
        assert text.endswith("How many objects are there?2")
    assert 5 < sum(match for match, _ in answers.values()) < 35  # about half the scaffolds say yes


lookup = load_script("bench/lookup_probe.py", "lookup_probe")


def test_lookup_targets_only_answers_held_by_one_object_of_several():
    objects = [{"colour": "red", "shape": "circle", "cell": [0, 0]},
               {"colour": "red", "shape": "square", "cell": [1, 2]},
               {"colour": "blue", "shape": "circle", "cell": [2, 1]}]
    qa = [{"type": "colour", "question": "What colour is the square?", "answer": "red"},  # red: two objects
          {"type": "colour", "question": "What colour is the object at the bottom?", "answer": "blue"},
          {"type": "shape", "question": "What shape is the object on the right?", "answer": "square"},
          {"type": "count", "question": "How many objects are there?", "answer": "3"}]
    rows = lookup.target_questions({"objects": objects, "qa": qa})
    assert [(r["answer"], r["target"]) for r in rows] == [("blue", (2, 1)), ("square", (1, 2))]
    assert rows[0]["others"] == [(0, 0), (1, 2)]
    assert lookup.target_questions({"objects": objects[:1], "qa": qa}) == []  # one object: nothing to find


def test_lookup_patch_columns_are_row_major_with_every_id_of_the_patch():
    columns = list(range(10, 28))  # 9 patches x 2 ids
    assert lookup.patch_columns(columns, (0, 0), 2) == [10, 11]
    assert lookup.patch_columns(columns, (1, 2), 2) == [20, 21]  # patch 5
    assert lookup.patch_columns(columns, (2, 2), 2) == [26, 27]


def test_lookup_probe_refuses_codes_without_one_cell_per_patch(tmp_path):
    import json

    import pytest

    from mmcore.errors import UserError
    from unified_mm.tokenizer_cli import PRECOMPUTED_FORMAT
    (tmp_path / "manifest.json").write_text(json.dumps({"format": PRECOMPUTED_FORMAT, "grid_size": 8}))
    with pytest.raises(UserError, match="grid_size 8"):
        lookup.probe(None, str(tmp_path), "val", 10)


def test_lookup_head_weights_are_each_heads_attention_distribution():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64))
    model.config._attn_implementation = "eager"
    weights = lookup.head_weights(model, [1, 5, 7, 9, 3])
    assert weights.shape == (2, 2, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2), atol=1e-5) and bool((weights >= 0).all())


def test_lookup_cell_labels_name_each_patch_occupant_in_row_major_order():
    meta = {"objects": [{"colour": "red", "shape": "circle", "size": "small", "cell": [1, 2]}]}
    codes = np.arange(18).reshape(9, 2)
    rows = list(lookup.cell_labels(codes, meta))
    assert len(rows) == 9 and rows[5][0] == (10, 11) and rows[5][2] == 1
    assert rows[5][1] == {"occupied": True, "colour": "red", "shape": "circle", "size": "small"}
    assert [r[1]["occupied"] for r in rows].count(True) == 1 and rows[0][1]["colour"] is None


def test_lookup_code_table_scores_the_whole_code_and_each_group_alone():
    """Colour is the XOR of the two group ids' lowest bits: the pair names it, neither id alone
    does (the majority of either group's id is right for half the cells); either id alone tells an
    empty cell from an occupied one."""
    colours = {0: "red", 1: "blue"}

    def image(a: int, b: int) -> tuple:
        codes = np.zeros((9, 2), dtype=np.int64)
        codes[0] = (2 + a, 2 + b)  # occupied cell: ids 2-3 in each group
        meta = {"objects": [{"colour": colours[a ^ b], "shape": "circle", "size": "small", "cell": [0, 0]}]}
        return codes, meta

    rows = [image(a, b) for a in (0, 1) for b in (0, 1)]
    whole = lookup.majority_table_accuracy(rows * 3, rows)
    assert whole["colour"] == {1: 1.0} and whole["occupied"] == {1: 1.0}
    for group in (0, 1):
        alone = lookup.majority_table_accuracy(rows * 3, rows, part=group)
        assert alone["colour"] == {1: 0.5}  # ties break the same way for both ids: half right
        assert alone["occupied"] == {1: 1.0}  # empty cells are id 0, occupied 2-3, in both groups
    unseen = lookup.majority_table_accuracy(rows[:1], rows[1:])
    assert unseen["colour"] == {1: 0.0}  # codes never seen in training count as wrong


def test_bench_qa_filter_keeps_types_and_question_prefix(monkeypatch):
    from unified_mm.data import mixture
    monkeypatch.setattr(mixture, "_qa_pairs", mixture._qa_pairs)  # restored after the test
    budget.use_qa_types(("colour",), "What colour is the object ")
    meta = {"qa": [{"type": "colour", "question": "What colour is the object on the left?", "answer": "red"},
                   {"type": "colour", "question": "What colour is the square?", "answer": "blue"},
                   {"type": "shape", "question": "What shape is the object on the left?", "answer": "circle"}]}
    assert mixture._qa_pairs(meta) == [("What colour is the object on the left?", "red")]


def test_lookup_questions_add_fresh_true_questions_to_several_object_chats_only(tok, vocab, monkeypatch):  # noqa: F811
    import random

    from unified_mm.data import mixture
    from unified_mm.data.shapesworld import Scene, SceneObject, ShapesWorldConfig, describe, scene_to_meta

    from tests.test_shapesworld import expected_answer

    monkeypatch.setattr(mixture, "build_sequence", mixture.build_sequence)  # restored after the test
    budget.use_lookup_questions(5)
    config = ShapesWorldConfig()
    several = Scene((0, 0, 0), (SceneObject("red", "circle", "large", (0, 0), (0, 0)),
                                SceneObject("blue", "circle", "small", (1, 2), (0, 0)),
                                SceneObject("red", "square", "small", (2, 1), (0, 0))), 0)
    one = Scene((0, 0, 0), (SceneObject("green", "cross", "large", (1, 1), (0, 0)),), 0)
    codes = np.zeros((vocab.num_patches, vocab.code_groups), np.int64)
    for scene, extra in ((several, 5), (one, 0)):
        stored = describe(scene, random.Random(0), config)[1]
        meta = {**scene_to_meta(scene, config), "qa": stored}
        for seed in range(5):
            seq = mixture.build_sequence("chat", codes, meta, random.Random(seed),
                                         mixture.MixtureConfig(chat_turns=5), make_builder(tok, vocab, 1024))
            text = tok.decode([i for i in seq.ids if i < vocab.image_start])
            pairs = _question_answer_pairs(text)
            assert len(pairs) == len(stored) + extra and len({q for q, _ in pairs}) == len(pairs)
            assert {q for q, _ in pairs} >= {qa["question"] for qa in stored}  # every stored question kept
            for question, answer in pairs:
                assert answer == expected_answer(question, meta["objects"]), (question, answer)
            fresh = [q for q, _ in pairs if q not in {qa["question"] for qa in stored}]
            assert all(q.startswith(("What colour is", "What shape is", "Where is")) for q in fresh)


def test_place_questions_ask_about_empty_and_occupied_cells_with_true_answers(tok, vocab, monkeypatch):  # noqa: F811
    import random

    from unified_mm.data import mixture
    from unified_mm.data.shapesworld import (LOCATION_PHRASES, POSITION_NAMES, Scene, SceneObject, ShapesWorldConfig,
                                             describe, scene_to_meta)

    monkeypatch.setattr(mixture, "build_sequence", mixture.build_sequence)  # restored after the test
    budget.use_place_questions(2)
    config = ShapesWorldConfig()
    scene = Scene((0, 0, 0), (SceneObject("red", "circle", "large", (0, 0), (0, 0)),
                              SceneObject("blue", "square", "small", (1, 2), (0, 0))), 0)
    stored = describe(scene, random.Random(0), config)[1]
    meta = {**scene_to_meta(scene, config), "qa": stored}
    truth = {f"What is {LOCATION_PHRASES[POSITION_NAMES[r][c]]}?": "nothing" for r in range(3) for c in range(3)}
    truth.update({"What is in the top left?": "a red circle", "What is on the right?": "a blue square"})
    codes = np.zeros((vocab.num_patches, vocab.code_groups), np.int64)
    answers = []
    for seed in range(20):
        seq = mixture.build_sequence("chat", codes, meta, random.Random(seed),
                                     mixture.MixtureConfig(chat_turns=5), make_builder(tok, vocab, 1024))
        pairs = _question_answer_pairs(tok.decode([i for i in seq.ids if i < vocab.image_start]))
        fresh = [(q, a) for q, a in pairs if q.startswith("What is ")]
        assert len(pairs) == min(5, len(stored)) + 2 and len(fresh) == 2 and fresh[0][0] != fresh[1][0]
        assert all(truth[q] == a for q, a in fresh), fresh
        answers += [a for _, a in fresh]
    assert "nothing" in answers and len(set(answers)) == 3  # empty cells and both objects asked about


def _question_answer_pairs(text: str) -> list[tuple[str, str]]:
    """"Q1?A1Q2?A2" (a decoded chat without specials) -> [(Q1?, A1), (Q2?, A2)]: every answer is
    one of ShapesWorld's lowercase words, every question starts with a capital."""
    import re

    return [(q.strip(), a.strip()) for q, a in re.findall(r"([A-Z][^?]*\?)([^A-Z]*)", text)]
