"""Fuzz-style robustness of the readers of external dataset files: malformed JSON/JSONL inputs.

Readers covered: the LLaVA/COCO converters (``unified_mm.data.converters``, including image paths
that try to leave the image folder and ``--add-split`` onto broken manifests) and the
``eval.formats`` and ``eval.answer_file`` readers. Accepted outcomes and the ``outcomes`` fixture are in
``tests/fuzz_env.py``.
"""
from __future__ import annotations

import json
import shutil
from typing import Any

from PIL import Image

from fuzz_env import outcomes  # noqa: F401, F811 -- outcomes is a fixture


# ---------------------------------------------------------------------------------------------
# Converters and eval formats
# ---------------------------------------------------------------------------------------------

def test_converters(tmp_path, outcomes):
    from unified_mm.data.converters import ConvertOptions, convert_coco, convert_llava
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(images / "ok.png")
    (images / "fake.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    options = ConvertOptions(image_size=16, shard_size=4, progress=False)
    qa = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]
    llava_cases: dict[str, Any] = {
        "top-dict": {"a": 1}, "top-int": 5, "empty-list": [], "records-int": [1, 2, 3],
        "record-no-conv": [{"id": 1, "image": "ok.png"}], "conv-str": [{"id": 1, "image": "ok.png", "conversations": "x"}],
        "conv-turn-int": [{"id": 1, "image": "ok.png", "conversations": [1]}],
        "turn-no-value": [{"id": 1, "image": "ok.png", "conversations": [{"from": "human"}]}],
        "turn-value-int": [{"id": 1, "image": "ok.png", "conversations": [{"from": "human", "value": 5}]}],
        "image-int": [{"id": 1, "image": 5, "conversations": qa}],
        "image-list": [{"id": 1, "image": ["ok.png"], "conversations": qa}],
        "escape-dotdot": [{"id": 1, "image": "../outside.png", "conversations": qa}],
        "escape-abs": [{"id": 1, "image": str(tmp_path / "outside.png"), "conversations": qa}],
        "escape-symlink": [{"id": 1, "image": "link.png", "conversations": qa}],
        "escape-drive": [{"id": 1, "image": "C:\\x.png", "conversations": qa}],
        "nul-in-path": [{"id": 1, "image": "ok\u0000.png", "conversations": qa}],
        "fake-image": [{"id": 1, "image": "fake.png", "conversations": qa}],
        "id-dict": [{"id": {"x": 1}, "image": "ok.png", "conversations": qa}],
        "unicode": [{"id": "ü", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\n\u202e😀"},
                                                                    {"from": "gpt", "value": "\u0000"}]}],
        "good": [{"id": 1, "image": "ok.png", "conversations": qa}],
    }
    coco_cases: dict[str, Any] = {
        "top-list": [], "no-images": {"annotations": []}, "images-str": {"images": "x", "annotations": []},
        "image-no-file": {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a"}]},
        "caption-int": {"images": [{"id": 1, "file_name": "ok.png"}], "annotations": [{"image_id": 1, "caption": 5}]},
        "caption-empty": {"images": [{"id": 1, "file_name": "ok.png"}], "annotations": [{"image_id": 1, "caption": " "}]},
        "ann-unknown-image": {"images": [{"id": 1, "file_name": "ok.png"}],
                              "annotations": [{"image_id": 2, "caption": "a"}]},
        "file-escape": {"images": [{"id": 1, "file_name": "../outside.png"}],
                        "annotations": [{"image_id": 1, "caption": "a"}]},
        "dup-ids": {"images": [{"id": 1, "file_name": "ok.png"}] * 2, "annotations": [{"image_id": 1, "caption": "a"}]},
        "annotations-dict": {"images": [{"id": 1, "file_name": "ok.png"}], "annotations": {"image_id": 1}},
        "good": {"images": [{"id": 1, "file_name": "ok.png"}], "annotations": [{"image_id": 1, "caption": "a red one"}]},
    }
    for fmt, cases, convert in (("llava", llava_cases, convert_llava), ("coco", coco_cases, convert_coco)):
        for index, (name, data) in enumerate(cases.items()):
            path = tmp_path / f"{fmt}-{index}.json"
            path.write_text(json.dumps(data))
            out = tmp_path / f"out-{fmt}-{index}"
            result = outcomes.run(f"convert_{fmt}", name, lambda: convert(path, images, out, options))
            if name.startswith(("escape", "file-escape")):
                assert result is None or result.written == 0, f"{fmt}/{name} converted an image outside the root"
        for name, data in (("garbage", b"\xff{["), ("deep", b"[" * 50000 + b"]" * 50000)):
            garbage = tmp_path / f"{fmt}-{name}.json"
            garbage.write_bytes(data)
            outcomes.run(f"convert_{fmt}", name, lambda: convert(garbage, images, tmp_path / f"g-{fmt}", options))
    # --add-split onto a dataset whose manifest lists shards outside it
    good = tmp_path / "llava-good.json"
    good.write_text(json.dumps(llava_cases["good"]))
    out = tmp_path / "dataset"
    convert_llava(good, images, out, options)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, shards in (("escape", ["../outside.png"]), ("absolute", [str(tmp_path / "outside.png")]),
                         ("not-list", "x"), ("int", [5])):
        broken = tmp_path / f"dataset-{name}"
        shutil.copytree(out, broken)
        bad = json.loads(json.dumps(manifest))
        bad["splits"]["extra"] = {"samples": 1, "shards": shards}
        (broken / "manifest.json").write_text(json.dumps(bad))
        result = outcomes.run("convert_llava", f"add-split-{name}", lambda: convert_llava(
            good, images, broken, options._replace(split="val", add_split=True)))
        assert result is None, f"add-split with manifest shards {shards!r} was accepted"
    outcomes.assert_clean()


def test_eval_formats(tmp_path, outcomes):
    from eval import answer_file, formats
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    (tmp_path / "secret.png").write_bytes(b"x")
    values: dict[str, bytes] = {
        "garbage": b"{[", "not-utf8": b"\xff\xfe\x00", "empty": b"", "list": b"[]", "obj": b"{}", "null": b"null",
        "deep": b"[" * 50000 + b"]" * 50000,
    }
    structured = {
        "vqa-questions-str": {"questions": "x"}, "vqa-question-bad": {"questions": [{"question_id": 1.5}]},
        "vqa-question-dup": {"questions": [{"question_id": 1, "image_id": 1, "question": "q"}] * 2},
        "vqa-question-types": {"questions": [{"question_id": [1], "image_id": "x", "question": 5}]},
        "coco-images-dict": {"images": {}, "annotations": []},
        "coco-ann-unknown": {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 9, "caption": "x"}]},
        "coco-caption-int": {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": 3}]},
        "llava-escape": [{"id": 1, "image": "../secret.png", "conversations": [{"from": "human", "value": "q"}]}],
        "llava-abs": [{"id": 1, "image": str(tmp_path / "secret.png"), "conversations": [{"from": "human", "value": "q"}]}],
        "llava-bad-from": [{"id": 1, "image": "a.png", "conversations": [{"from": "system", "value": "q"}]}],
        "llava-conv-empty": [{"id": 1, "image": "a.png", "conversations": []}],
        "llava-image-list-int": [{"id": 1, "image": [1], "conversations": [{"from": "human", "value": "q"}]}],
    }
    jsonl = {
        "geneval-empty": b"", "geneval-garbage-line": b'{"prompt": "x"\n', "geneval-list-line": b"[]\n",
        "geneval-unknown-field": json.dumps({"prompt": "a", "include": [{"class": "circle", "bogus": 1}]}).encode(),
        "geneval-no-include": json.dumps({"prompt": "a", "include": []}).encode(),
        "geneval-bad-count": json.dumps({"prompt": "a", "include": [{"class": "circle", "count": -1}]}).encode(),
        "geneval-bad-position": json.dumps({"prompt": "a", "include": [{"class": "c", "position": [1, 2, 3]}]}).encode(),
        "questions-escape": json.dumps({"question_id": 1, "image": "../secret.png", "text": "q"}).encode(),
        "questions-dup": (json.dumps({"question_id": 1, "text": "q"}) + "\n"
                          + json.dumps({"question_id": 1, "text": "q"})).encode(),
        "answers-missing-fields": json.dumps({"question_id": 1}).encode(),
        "answers-metadata-list": json.dumps({"question_id": 1, "prompt": "p", "text": "t", "answer_id": "a",
                                             "model_id": "m", "metadata": []}).encode(),
        "answers-torn": b'{"question_id": 1, "pro',
    }
    readers = {
        "read_vqav2": lambda p: formats.read_vqav2(p), "read_coco_captions": formats.read_coco_captions,
        "read_llava_json": lambda p: formats.read_llava_json(p, images),
    }
    for reader_name, reader in readers.items():
        for name, data in values.items():
            path = tmp_path / f"{reader_name}-{name}.json"
            path.write_bytes(data)
            outcomes.run(f"eval.{reader_name}", name, lambda: reader(path))
    for name, obj in structured.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(obj))
        prefix = name.split("-")[0]
        reader_name = {"vqa": "read_vqav2", "coco": "read_coco_captions", "llava": "read_llava_json"}[prefix]
        result = outcomes.run(f"eval.{reader_name}", name, lambda: readers[reader_name](path))
        if "escape" in name or "abs" in name:
            assert result is None, f"{name}: a path outside the image folder was accepted"
    for name, data in {**jsonl, **{f"raw-{k}": v for k, v in values.items()}}.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        for reader_name, reader in (("read_geneval_jsonl", formats.read_geneval_jsonl),
                                    ("read_llava_questions", lambda p: formats.read_llava_questions(p, images)),
                                    ("read_answer_file", answer_file.read_answer_file)):
            result = outcomes.run(f"eval.{reader_name}", name, lambda: reader(path))
            if name == "questions-escape" and reader_name == "read_llava_questions":
                assert result is None, "a question image outside the image folder was accepted"
    outcomes.run("eval.read_vqav2", "missing", lambda: formats.read_vqav2(tmp_path / "missing.json"))
    outcomes.assert_clean()
