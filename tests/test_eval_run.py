"""The evaluation runner end to end on a tiny random-weight model: every task, results.json and the
report, resume after an interruption, bad input, and the real-format readers through the CLI."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from eval import run
from eval.metrics.image import ConvNetConfig, build_conv_feature_net
from mmcore.text_tokenizer import TextTokenizer, train_sentencepiece
from tests.sampling_env import LLAMA_SMALL, QLIP_SMALL
from tokenizer.export import load_tokenizer, save_tokenizer
from tokenizer.qlip import QLIP, preset_config
from unified_mm.data import shapesworld_cli
from unified_mm.export import save_unified
from unified_mm.model import UnifiedModelConfig, build_model
from unified_mm.tokenizer_cli import precompute
from unified_mm.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["What colour is the object on the left?", "How many objects are there?", "a red circle",
         "a large blue square in the top left", "yes no 1 2 3 top bottom left right centre",
         "Describe the image.", "Is there a green cross?", "There are two objects: a small red circle",
         "red green blue yellow purple cyan circle square triangle cross"] * 10
TASKS = ("zero_shot", "reconstruction", "vqa", "caption", "t2i")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """ShapesWorld (6 test images), a 4x4-grid QLIP export, its codes, a tiny unified export and a
    random FID feature network."""
    root = tmp_path_factory.mktemp("eval_run")
    torch.manual_seed(0)
    data, codes = root / "data", root / "codes"
    assert shapesworld_cli.main(["--config", str(ROOT / "configs/data/shapesworld_tiny.yaml"), "--out", str(data),
                                 "--quiet", "splits.train=2", "splits.val=2", "splits.test=6",
                                 "samples_per_shard=8"]) == 0
    text_path = train_sentencepiece(TEXTS, root / "text.model", vocab_size=300)
    qlip = save_tokenizer(QLIP(preset_config("tiny", QLIP_SMALL)), root / "qlip", text_tokenizer_path=text_path)
    precompute(load_tokenizer(qlip), data, ["test"], codes, batch_size=8, progress=False)
    text = TextTokenizer(text_path)
    vocab = Vocab.for_tokenizers(text.vocab_size, 12, 6, 4)
    model = build_model(UnifiedModelConfig(overrides={**LLAMA_SMALL, "max_position_embeddings": 160}), vocab,
                        text_pieces=text.n_text).eval()
    export = save_unified(model, vocab, root / "export", text_tokenizer_path=text_path, tokenizer_dir=qlip,
                          sampler_defaults={"cfg_scale": 3.0, "max_new_tokens": 6})
    fid_net = root / "fid_net"
    fid_net.mkdir()
    (fid_net / "config.json").write_text(json.dumps({"format": "conv-feature-net", "channels": [4, 8]}))
    save_file(build_conv_feature_net(ConvNetConfig(channels=[4, 8])).state_dict(), str(fid_net / "model.safetensors"))
    return {"root": root, "data": data, "codes": codes, "qlip": qlip, "export": export, "fid": fid_net}


def base_args(env, out, *extra):
    return ["--model", str(env["export"]), "--tokenizer", str(env["qlip"]), "--data", str(env["data"]),
            "--codes", str(env["codes"]), "--out", str(out), "--limit", "3", "--batch-size", "4",
            "--cfg-scales", "1,3", "--quiet", *extra]


def scores_of(results):
    return {name: task["scores"] for name, task in results["tasks"].items()}


@pytest.fixture(scope="module")
def full_run(env):
    out = env["root"] / "out"
    assert run.main(base_args(env, out, "--fid-network", str(env["fid"]))) == 0
    return out


def test_every_task_scored_with_hashes_and_report(env, full_run):
    results = json.loads((full_run / "results.json").read_text())
    assert list(results["tasks"]) == list(TASKS)
    assert results["model"]["hash"] and results["model"]["tokenizer_hash"] == results["tokenizer"]["hash"]
    assert results["versions"]["torch"] and results["seeds"]["seed"] == 0
    assert results["machine"]["cpu"] and results["machine"]["cpus"] >= 1 and "gpu" not in results["machine"]
    assert set(results["timings"]) == {*TASKS, "total_s"}
    scores = scores_of(results)
    assert 0 <= scores["reconstruction"]["ssim"] <= 1 and scores["reconstruction"]["fid"] >= 0
    zs = scores["zero_shot"]  # colour+shape right implies each right; each right on its own is at least as often
    if zs["images"]:
        assert zs["accuracy"] <= min(zs["colour_accuracy"], zs["shape_accuracy"])
        assert zs["colour_accuracy"] + zs["shape_accuracy"] - 1 <= zs["accuracy"]
    assert scores["reconstruction"]["judge_accuracy_originals"] == 1.0     # the judge is exact on originals
    vqa = scores["vqa"]
    assert vqa["questions"] == 15 and 0 <= vqa["soft_accuracy"] <= 1 and "per_type" in vqa and "yes_no" in vqa
    assert set(vqa["per_objects"]) <= {"1", "2", "3"}
    assert sum(v["n"] for v in vqa["per_objects"].values()) == vqa["scored"]
    crossed = vqa["per_objects_x_type"]  # every question in exactly one (objects, type) cell
    assert sum(v["n"] for v in crossed.values()) == vqa["scored"]
    for cell, v in crossed.items():
        objects, kind = cell.split(" / ")
        assert v["n"] <= min(vqa["per_objects"][objects]["n"], vqa["per_type"][kind]["n"])
    assert set(scores["caption"]) >= {"cider_d", "bleu_4"} and scores["caption"]["images"] == 3
    t2i = scores["t2i"]
    assert {"cfg_1", "cfg_3", "ceiling_reconstruction", "judge_on_ground_truth"} <= set(t2i)
    assert t2i["cfg_3"]["num_prompts"] == 6 and t2i["judge_on_ground_truth"]["whole"] == 1.0
    assert t2i["caption_gain"]["prompts"] == 6 and math.isfinite(t2i["caption_gain"]["nats_per_image"])
    assert len((full_run / "answers/vqa.jsonl").read_text().splitlines()) == 15
    report = (full_run / "report.md").read_text()
    assert "| vqa | soft accuracy (VQAv2) |" in report
    assert f"Machine: {results['machine']['cpu']}, {results['machine']['cpus']} CPUs" in report
    assert "| t2i | caption's gain: image loss without minus with the prompt (nats/image) |" in report
    for figure in ("figures/reconstruction.png", "figures/t2i.png"):
        assert f"]({figure})" in report and Image.open(full_run / figure).size[0] > 0


def test_resume_after_interruption_gives_the_same_results(env, full_run):
    out = env["root"] / "resumed"
    shutil.copytree(full_run, out)
    (out / "results.json").unlink()
    originals = {}
    for task in ("vqa", "caption"):
        path = out / "answers" / f"{task}.jsonl"
        originals[task] = path.read_bytes()
        lines = originals[task].splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:len(lines) // 2]) + lines[len(lines) // 2][:7])  # + a torn line
    assert run.main(base_args(env, out, "--fid-network", str(env["fid"]), "--resume")) == 0
    before = json.loads((full_run / "results.json").read_text())
    after = json.loads((out / "results.json").read_text())
    assert scores_of(after) == scores_of(before)
    for task in ("vqa", "caption"):
        assert (out / "answers" / f"{task}.jsonl").read_bytes() == originals[task]
        stats = after["tasks"][task]["info"]["answers"]
        total = len(originals[task].splitlines())
        assert (stats["resumed"], stats["generated"]) == (total // 2, total - total // 2)
    assert after["tasks"]["t2i"]["info"]["reused_draws"] == [1.0, 3.0]    # finished draws are not redone


def error_line(capsys, argv) -> str:
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    return err


def test_bad_input_is_one_line_exit_2(env, full_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.main(["--help"])
    usage = capsys.readouterr().out
    assert all(name in usage for name in TASKS)
    err = error_line(capsys, base_args(env, tmp_path / "a", "--tasks", "vqa,nope"))
    assert "unknown task 'nope'" in err and all(name in err for name in TASKS)
    err = error_line(capsys, base_args(env, tmp_path / "b") + ["--data", str(tmp_path / "missing")])
    assert "--data" in err and "missing" in err
    err = error_line(capsys, ["--tasks", "vqa", "--data", str(env["data"]), "--out", str(tmp_path)])
    assert "needs --model" in err
    out = tmp_path / "other"
    (out / "answers").mkdir(parents=True)
    record = {"question_id": "x", "prompt": "p", "text": "t", "answer_id": "a", "model_id": "another-model",
              "metadata": {}}
    (out / "answers" / "vqa.jsonl").write_text(json.dumps(record) + "\n")
    assert "answer file from another model" in error_line(capsys, base_args(env, out, "--tasks", "vqa", "--resume"))
    assert "--resume" in error_line(capsys, base_args(env, full_run, "--tasks", "vqa"))


def test_task_limit_and_sampler_flags(env, full_run, tmp_path, capsys):
    out = tmp_path / "task_limit"
    argv = base_args(env, out, "--tasks", "zero_shot,caption,reconstruction,t2i", "--task-limit", "caption=5",
                     "--task-limit", "reconstruction=all", "--task-limit", "t2i=1", "--temperature", "0.5",
                     "--top-k", "3")
    assert run.main(argv) == 0
    scores = scores_of(json.loads((out / "results.json").read_text()))
    assert scores["caption"]["images"] == 5 and scores["reconstruction"]["images"] == 6   # 6 test images
    assert scores["t2i"]["cfg_3"]["num_prompts"] == 2     # one image's short and long caption
    settings = scores["t2i"]["cfg_3"]["settings"]
    assert (settings["temperature"], settings["top_k"], settings["top_p"]) == (0.5, 3, 1.0)
    assert scores["zero_shot"] == scores_of(json.loads((full_run / "results.json").read_text()))["zero_shot"]
    for value, problem in (("vqa", "expected TASK=N"), ("ocr=3", "expected TASK=N"), ("vqa=0", ">= 1"),
                           ("vqa=many", "whole number")):
        err = error_line(capsys, base_args(env, tmp_path / "bad", "--task-limit", value))
        assert f"--task-limit '{value}'" in err and problem in err


def test_real_formats_through_the_cli(env, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for image_id in (1, 2):  # not square and not the tokenizer's size: resized and centre-cropped
        Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(
            images / f"COCO_val2014_{image_id:012d}.jpg")
    questions = [{"question_id": 10 + i, "image_id": 1 + i % 2, "question": q}
                 for i, q in enumerate(["Is there a red circle?", "How many objects are there?", "What colour?"])]
    answers = [["yes"] * 8 + ["no"] * 2, ["2"] * 5 + ["two"] * 5, ["red"] * 10]
    annotations = [{"question_id": q["question_id"], "image_id": q["image_id"],
                    "answers": [{"answer": a} for a in ans],
                    "multiple_choice_answer": ans[0], "answer_type": ["yes/no", "number", "other"][i],
                    "question_type": "what"} for i, (q, ans) in enumerate(zip(questions, answers))]
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": annotations}))
    coco = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2)],
            "annotations": [{"image_id": i, "caption": c} for i in (1, 2) for c in ("a red circle", "a blue square")]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (tmp_path / "geneval.jsonl").write_text(json.dumps({"prompt": "a red circle", "tag": "single",
                                                        "include": [{"class": "circle", "color": "red"}]}) + "\n")
    out = tmp_path / "out"
    args = ["--model", str(env["export"]), "--tasks", "vqa,caption,t2i",
            "--vqav2-questions", str(tmp_path / "q.json"),
            "--vqav2-annotations", str(tmp_path / "a.json"), "--coco-captions", str(tmp_path / "coco.json"),
            "--geneval", str(tmp_path / "geneval.jsonl"), "--images", str(images), "--cfg-scales", "2",
            "--out", str(out), "--quiet"]
    assert run.main(args) == 0
    scores = scores_of(json.loads((out / "results.json").read_text()))
    assert scores["vqa"]["scored"] == 3 and set(scores["vqa"]["per_answer_type"]) == {"yes/no", "number", "other"}
    assert scores["caption"]["images"] == 2 and scores["caption"]["references"] == 4
    assert scores["t2i"]["cfg_2"]["num_prompts"] == 1 and "ceiling_reconstruction" not in scores["t2i"]
    assert "caption_gain" not in scores["t2i"]  # no true images to score the prompts against
    llava = [{"id": "s1", "image": f"COCO_val2014_{1:012d}.jpg",
              "conversations": [{"from": "human", "value": "<image>\nIs there a circle?"},
                                {"from": "gpt", "value": "Yes"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    assert run.main(["--model", str(env["export"]), "--tasks", "vqa", "--llava", str(tmp_path / "llava.json"),
                     "--images", str(images), "--out", str(tmp_path / "llava_out"), "--quiet"]) == 0
    record = json.loads((tmp_path / "llava_out/answers/vqa.jsonl").read_text())
    assert record["question_id"] == "s1" and record["prompt"] == "Is there a circle?"
