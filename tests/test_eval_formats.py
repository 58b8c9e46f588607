"""Benchmark format readers on small fixtures in each real format, their error messages, and the
resumable LLaVA answer writer (an interrupted file finishes byte-identical to an uninterrupted one).
"""
import json

import pytest

from eval import answer_file, formats
from mmcore.errors import UserError


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


# ---------------------------------------------------------------------------------------------
# VQAv2
# ---------------------------------------------------------------------------------------------

VQA_QUESTIONS = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                 "license": {}, "questions": [
                     {"image_id": 42, "question": "What color is the bus?", "question_id": 420},
                     {"image_id": 42, "question": "How many people?", "question_id": 421},
                     {"image_id": 7, "question": "Is it raining?", "question_id": 70}]}


def vqa_annotations():
    def answers(values):
        return [{"answer": v, "answer_confidence": "yes", "answer_id": i + 1} for i, v in enumerate(values)]
    return {"info": {}, "data_subtype": "val2014", "annotations": [
        {"question_id": 420, "image_id": 42, "question_type": "what color is the", "answer_type": "other",
         "multiple_choice_answer": "red", "answers": answers(["red"] * 9 + ["dark red"])},
        {"question_id": 421, "image_id": 42, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "2", "answers": answers(["2"] * 6 + ["3"] * 4)},
        {"question_id": 70, "image_id": 7, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "no", "answers": answers(["no"] * 10)}]}


def test_vqav2_questions_joined_with_annotations(tmp_path):
    questions = formats.read_vqav2(write_json(tmp_path / "q.json", VQA_QUESTIONS),
                                   write_json(tmp_path / "a.json", vqa_annotations()))
    assert [q.question_id for q in questions] == [420, 421, 70]
    first = questions[0]
    assert first.image_file == "COCO_val2014_000000000042.jpg"
    assert first.answers == ["red"] * 9 + ["dark red"] and first.answer_type == "other"
    assert first.multiple_choice_answer == "red" and first.question_type == "what color is the"
    unannotated = formats.read_vqav2(tmp_path / "q.json")          # test-dev: questions only
    assert unannotated[2].answers is None and unannotated[2].question == "Is it raining?"


def test_vqav2_errors_name_file_and_field(tmp_path):
    bad = json.loads(json.dumps(VQA_QUESTIONS))
    del bad["questions"][1]["question_id"]
    with pytest.raises(UserError, match=r"q\.json: questions\[1\]: missing field 'question_id'"):
        formats.read_vqav2(write_json(tmp_path / "q.json", bad))
    annotations = vqa_annotations()
    annotations["annotations"][0]["answers"][3] = {"answer": None}
    with pytest.raises(UserError, match=r"a\.json: annotations\[0\]\.answers\[3\]\.answer: expected a string"):
        formats.read_vqav2(write_json(tmp_path / "q2.json", VQA_QUESTIONS),
                           write_json(tmp_path / "a.json", annotations))
    annotations = vqa_annotations()
    annotations["annotations"].pop()
    with pytest.raises(UserError, match="no annotation for question 70"):
        formats.read_vqav2(tmp_path / "q2.json", write_json(tmp_path / "a.json", annotations))
    (tmp_path / "broken.json").write_text('{"questions": [')
    with pytest.raises(UserError, match=r"broken\.json: invalid JSON at line 1"):
        formats.read_vqav2(tmp_path / "broken.json")
    with pytest.raises(UserError, match="VQAv2 question file not found"):
        formats.read_vqav2(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# COCO captions
# ---------------------------------------------------------------------------------------------

COCO = {"info": {}, "licenses": [], "type": "captions",
        "images": [{"id": 9, "file_name": "COCO_val2014_000000000009.jpg", "height": 480, "width": 640},
                   {"id": 25, "file_name": "COCO_val2014_000000000025.jpg", "height": 426, "width": 640}],
        "annotations": [{"image_id": 9, "id": 1, "caption": "A plate of food. "},
                        {"image_id": 25, "id": 2, "caption": "A giraffe eating leaves."},
                        {"image_id": 9, "id": 3, "caption": "Broccoli and bread on a plate."}]}


def test_coco_captions(tmp_path):
    images = formats.read_coco_captions(write_json(tmp_path / "captions_val2014.json", COCO))
    assert [(i.image_id, i.file_name) for i in images] == [(9, "COCO_val2014_000000000009.jpg"),
                                                           (25, "COCO_val2014_000000000025.jpg")]
    assert images[0].captions == ["A plate of food.", "Broccoli and bread on a plate."]
    info_only = {k: v for k, v in COCO.items() if k != "annotations"}
    assert formats.read_coco_captions(write_json(tmp_path / "info.json", info_only))[1].captions == []
    orphan = json.loads(json.dumps(COCO))
    orphan["annotations"][1]["image_id"] = 99
    with pytest.raises(UserError, match=r"annotations\[1\]\.image_id: image 99 is not listed"):
        formats.read_coco_captions(write_json(tmp_path / "orphan.json", orphan))


# ---------------------------------------------------------------------------------------------
# GenEval prompt lists
# ---------------------------------------------------------------------------------------------

def test_geneval_jsonl_real_and_shapesworld_spellings(tmp_path):
    lines = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "position", "include": [{"class": "cow", "count": 1},
                                        {"class": "dog", "count": 1, "position": ["left of", 0]}],
         "prompt": "a photo of a dog left of a cow"},
        {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}],
         "prompt": "a photo of two cups"},
        {"tag": "short:1", "include": [{"shape": "circle", "colour": "red", "position": "top left"}],
         "prompt": "a red circle"},
    ]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    prompts = formats.read_geneval_jsonl(path)
    assert prompts[1].include[1] == {"class": "dog", "count": 1, "position": ["left of", 0]}
    assert prompts[2].exclude == [{"class": "cup", "count": 3}]
    assert prompts[3].include == [{"class": "circle", "count": 1, "color": "red", "position": "top left"}]
    formats.write_geneval_jsonl(tmp_path / "out.jsonl", prompts)
    assert formats.read_geneval_jsonl(tmp_path / "out.jsonl") == prompts
    assert '"color": "red"' in (tmp_path / "out.jsonl").read_text()      # written GenEval's way


@pytest.mark.parametrize("line, message", [
    ({"tag": "t", "include": [{"class": "cat", "count": 0}], "prompt": "p"},
     r":1\.include\[0\]\.count: expected a positive"),
    ({"tag": "t", "include": [{"class": "cat", "hue": "red"}], "prompt": "p"}, r"unknown field 'hue'"),
    ({"tag": "t", "include": [], "prompt": "p"}, r"include: empty"),
    ({"tag": "t", "include": [{"class": "cat"}]}, r":1: missing field 'prompt'"),
    ({"tag": "t", "include": [{"class": "cat", "position": 3}], "prompt": "p"},
     r"position: expected a position name"),
])
def test_geneval_errors(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(UserError, match=message):
        formats.read_geneval_jsonl(path)


def test_geneval_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"tag": "t", "include": [{"class": "c"}], "prompt": "p"}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"prompts\.jsonl:2: invalid JSON"):
        formats.read_geneval_jsonl(path)


# ---------------------------------------------------------------------------------------------
# LLaVA data and question files
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "coco" / "train2017").mkdir(parents=True)
    (root / "coco" / "train2017" / "000000033471.jpg").write_bytes(b"jpeg")
    (root / "a.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"outside")
    return root


def test_llava_json_conversations(tmp_path, image_root):
    data = [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
             "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                               {"from": "gpt", "value": "The bus is white and red."}]},
            {"id": "text-only",
             "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    samples = formats.read_llava_json(write_json(tmp_path / "llava.json", data), image_root)
    assert samples[0].images == (image_root / "coco" / "train2017" / "000000033471.jpg",)
    assert samples[0].conversations[1] == ("gpt", "The bus is white and red.")
    assert samples[1].images == ()


@pytest.mark.parametrize("image, message", [
    ("../secret.png", "leaves the image folder"),
    ("coco/../../secret.png", "leaves the image folder"),
    ("/etc/passwd", "must be relative"),
    ("missing.jpg", "image not found"),
])
def test_llava_image_paths_stay_inside_the_root(tmp_path, image_root, image, message):
    data = [{"id": 1, "image": image, "conversations": [{"from": "human", "value": "q"}]}]
    with pytest.raises(UserError, match=rf"llava\.json: \[0\]\.image: .*{message}"):
        formats.read_llava_json(write_json(tmp_path / "llava.json", data), image_root)


def test_llava_json_errors(tmp_path, image_root):
    bad_speaker = [{"id": 1, "conversations": [{"from": "robot", "value": "q"}]}]
    with pytest.raises(UserError, match=r"\[0\]\.conversations\[0\]\.from: expected 'human' or 'gpt'"):
        formats.read_llava_json(write_json(tmp_path / "l.json", bad_speaker), image_root)
    with pytest.raises(UserError, match="expected a JSON list"):
        formats.read_llava_json(write_json(tmp_path / "l.json", {"id": 1}), image_root)
    with pytest.raises(UserError, match="image folder not found"):
        formats.read_llava_json(tmp_path / "l.json", tmp_path / "nope")


def test_llava_question_jsonl(tmp_path, image_root):
    path = tmp_path / "llava_pope_test.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 1, "image": "a.png", "text": "Is there a dog in the image?", "label": "no",
         "category": "adversarial"},
        {"question_id": 2, "image": "a.png", "text": "Is there a bus in the image?", "label": "yes",
         "category": "adversarial"},
    ]) + "\n")
    questions = formats.read_llava_questions(path, image_root)
    assert [q.question_id for q in questions] == [1, 2]
    assert questions[0].images == (image_root / "a.png",) and questions[0].extra["label"] == "no"
    path.write_text(path.read_text() + json.dumps({"question_id": 2, "text": "again"}) + "\n")
    with pytest.raises(UserError, match=r":3\.question_id: duplicate question id 2"):
        formats.read_llava_questions(path, image_root)


# ---------------------------------------------------------------------------------------------
# Answer files: resumable writer
# ---------------------------------------------------------------------------------------------

QUESTIONS = [(qid, f"Question {qid}?", f"answer {qid} é") for qid in (3, 1, "q-7", 2, 5)]


def run_eval(path, model_id="tiny-unified@abc123", stop_after=None):
    """Answer every unanswered question in order; ``stop_after`` simulates a stop."""
    written = 0
    with answer_file.AnswerWriter(path, model_id) as writer:
        for qid, prompt, answer in QUESTIONS:
            if writer.is_done(qid):
                continue
            if stop_after is not None and written == stop_after:
                return writer.resumed
            writer.write(qid, prompt, answer, {"temperature": 0.0})
            written += 1
        return writer.resumed


def test_resumed_answer_file_equals_uninterrupted_run(tmp_path):
    run_eval(tmp_path / "full.jsonl")
    run_eval(tmp_path / "resumed.jsonl", stop_after=2)
    with open(tmp_path / "resumed.jsonl", "ab") as handle:   # killed in the middle of line 3
        handle.write(b'{"question_id": "q-7", "prompt": "Quest')
    assert run_eval(tmp_path / "resumed.jsonl") == 2            # two answers kept, torn line dropped
    assert (tmp_path / "resumed.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    records = answer_file.read_answer_file(tmp_path / "full.jsonl")
    assert [r["question_id"] for r in records] == [3, 1, "q-7", 2, 5]
    assert list(records[0]) == list(answer_file.ANSWER_FIELDS)
    assert records[2]["text"] == "answer q-7 é" and records[2]["metadata"] == {"temperature": 0.0}
    assert records[0]["answer_id"] == answer_file.answer_id_for("tiny-unified@abc123", 3)


def test_answer_file_from_another_model_is_refused(tmp_path):
    run_eval(tmp_path / "answers.jsonl", stop_after=1)
    with open(tmp_path / "answers.jsonl", "ab") as handle:
        handle.write(b'{"question_id": 1, "pro')                      # torn line: left as it is
    before = (tmp_path / "answers.jsonl").read_bytes()
    with pytest.raises(UserError, match=r"answer file from another model: .*answers\.jsonl:1 has model_id "
                                        r"'tiny-unified@abc123', this run's model is 'other@def456'"):
        answer_file.AnswerWriter(tmp_path / "answers.jsonl", "other@def456")
    assert (tmp_path / "answers.jsonl").read_bytes() == before


def test_answer_writer_guards(tmp_path):
    path = tmp_path / "answers.jsonl"
    with answer_file.AnswerWriter(path, "m") as writer:
        writer.write(1, "p", "t")
        with pytest.raises(ValueError, match="already answered"):
            writer.write(1, "p", "t")
        with pytest.raises(UserError, match="being written by another process"):
            answer_file.AnswerWriter(path, "m")
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(UserError, match=r"answers\.jsonl:2: invalid JSON .* corrupt"):
        answer_file.AnswerWriter(path, "m")
    no_answer_id = {"question_id": 1, "prompt": "p", "text": "t", "model_id": "m", "metadata": {}}
    path.write_text(json.dumps(no_answer_id) + "\n")
    with pytest.raises(UserError, match=r":1: missing field 'answer_id'"):
        answer_file.read_answer_file(path)
