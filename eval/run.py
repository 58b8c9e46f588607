"""Evaluate an exported unified model (and/or a QLIP tokenizer) on a list of tasks.

    python -m eval.run --model runs/demo/unified/export --tokenizer runs/demo/tokenizer_stage1/export \\
        --data runs/demo/data --codes runs/demo/codes --split test --out runs/demo/eval
    python -m eval.run --model M --tasks vqa,caption --vqav2-questions q.json --vqav2-annotations a.json \\
        --coco-captions captions.json --images val2014/ --limit 500 --out eval_real/

Writes ``OUT/results.json`` (scores per task, the arguments, model and tokenizer hashes, seeds,
package versions, timings) and ``OUT/report.md`` (score table, detail tables, image grids under
``OUT/figures/``), both atomically. VQA and captioning answers go to LLaVA answer files
``OUT/answers/{task}.jsonl``; after an interruption, ``--resume`` continues them without redoing
finished answers (and reuses finished text-to-image draws, ``OUT/t2i/``).

ShapesWorld tasks read ``--split`` of ``--data`` (images) and ``--codes`` (precomputed codes of the
model's bundled tokenizer; without it, images are encoded on the fly). Real formats replace the
ShapesWorld source of one task: ``--vqav2-questions``/``--llava`` for vqa, ``--coco-captions``
for caption, ``--geneval`` for t2i; their images (``--images``) are resized and centre-cropped to
the tokenizer's size and encoded with the model's bundled QLIP. ``--limit N`` keeps the first N
samples of each source (images on ShapesWorld, questions/images/prompts in real formats).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from mmcore.errors import UserError, cli_entry
from mmcore.io import atomic_write_text
from mmcore.machine import describe
from unified_mm.export import read_unified_header, unified_hash
from unified_mm.sample_cli import Parser, check_device

from eval import tasks
from eval.answer_file import AnswerWriter
from eval.context import Context
from eval.report import format_value, write_report

RESULTS_FORMAT = "qlip-eval/1"
PACKAGES = ("qlip-unified", "torch", "transformers", "numpy", "sentencepiece", "pillow", "safetensors",
            "webdataset", "tqdm")


class Task(NamedTuple):
    run: Callable[[Context], dict]
    needs: tuple[str, ...]      # keys of NEEDS
    help: str
    answers: bool = False       # writes a resumable answer file


# requirement -> (satisfied by these arguments?, how to satisfy it)
NEEDS = {
    "model": (lambda a: a.model, "--model"),
    "tokenizer": (lambda a: a.model or a.tokenizer, "--model or --tokenizer"),
    "data": (lambda a: a.data, "--data (a ShapesWorld directory)"),
    "vqa_source": (lambda a: a.vqav2_questions or a.llava or a.codes or a.data,
                   "--vqav2-questions, --llava, --codes or --data"),
    "caption_source": (lambda a: a.coco_captions or a.codes or a.data, "--coco-captions, --codes or --data"),
    "t2i_source": (lambda a: a.geneval or a.codes or a.data, "--geneval, --codes or --data"),
}

# The one table of evaluators (run order = table order).
TASKS: dict[str, Task] = {
    "zero_shot": Task(tasks.zero_shot, ("tokenizer", "data"),
                      "zero-shot colour+shape classification of single-object images with the tokenizer's "
                      "text tower (prompt templates: --zero-shot-template)"),
    "reconstruction": Task(tasks.reconstruction, ("tokenizer", "data"),
                           "tokenizer reconstructions: PSNR, SSIM, pixel-judge accuracy (the text-to-image "
                           "ceiling), FID with --fid-network"),
    "vqa": Task(tasks.vqa, ("model", "vqa_source"),
                "greedy answers via the chat template: VQAv2 soft accuracy, exact match, per-type accuracy, "
                "POPE-style yes/no accuracy/precision/recall/F1", answers=True),
    "caption": Task(tasks.caption, ("model", "caption_source"),
                    "greedy captions for 'Describe the image.': CIDEr-D and BLEU-1..4 against all references",
                    answers=True),
    "t2i": Task(tasks.text_to_image, ("model", "t2i_source"),
                "text-to-image at each --cfg-scales value, judged by the pixel analyser (GenEval style: "
                "per-attribute and whole-prompt accuracy), beside the judge on tokenizer reconstructions "
                "and (ShapesWorld) the caption's gain: how much the prompt lowers its true image's loss"),
}

PATHS = (("model", "unified model export", "dir"), ("tokenizer", "tokenizer export", "dir"),
         ("data", "ShapesWorld directory", "dir"), ("codes", "precomputed codes directory", "dir"),
         ("images", "image folder", "dir"), ("vqav2_questions", "VQAv2 question file", "file"),
         ("vqav2_annotations", "VQAv2 annotation file", "file"), ("coco_captions", "COCO caption file", "file"),
         ("geneval", "GenEval prompt list", "file"), ("llava", "LLaVA file", "file"),
         ("fid_network", "feature network", "any"))


def build_parser() -> argparse.ArgumentParser:
    epilog = "tasks:\n" + "\n".join(f"  {name:15s} {task.help}" for name, task in TASKS.items())
    parser = Parser(prog="python -m eval.run", description=__doc__.split("\n\n")[0], epilog=epilog,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", help="unified model export directory")
    add("--tokenizer", help="QLIP tokenizer export (zero_shot: a stage-1 export with its text tower)")
    add("--data", help="ShapesWorld directory (shards + config.yaml)")
    add("--codes", help="precomputed codes of --data for the model's bundled tokenizer")
    add("--split", default="test", help="ShapesWorld split (default test)")
    add("--tasks", default="all", help=f"comma-separated, or 'all' (default): {','.join(TASKS)}")
    add("--out", required=True, help="output directory")
    add("--limit", type=int, help="first N samples of each task's source (default all)")
    add("--task-limit", action="append", metavar="TASK=N", help="a different --limit for one task, "
        "e.g. zero_shot=1000 (repeatable; N may be 'all')")
    add("--resume", action="store_true", help="continue the answer files and t2i draws in --out")
    add("--seed", type=int, default=0, help="t2i: image i uses seed + i; vqa question choice (default 0)")
    add("--batch-size", type=int, default=32, help="images / questions per forward (default 32)")
    add("--device", default="cpu", help="torch device (default cpu)")
    add("--quiet", action="store_true", help="no progress bars")
    add("--report-rows", type=int, default=8, help="images / prompts shown in the report's grids (default 8)")
    add("--max-new-tokens", type=int, help="answer length cap (default: the export's sampler default)")
    add("--vqa-per-image", default="all", help="ShapesWorld questions per image: 'all' (default) or N")
    add("--zero-shot-template", action="append", help="prompt template with {colour} and {shape} "
        "(repeatable: a prompt ensemble; default 'a {colour} {shape}')")
    add("--cfg-scales", help="t2i guidance scales, e.g. 1,3 (default: 1 and the export's cfg_scale)")
    add("--temperature", type=float, help="t2i sampling temperature, 0 = argmax (default: the export's)")
    add("--top-k", type=int, help="t2i: keep the k most likely ids per group, 0 = off (default: the export's)")
    add("--top-p", type=float, help="t2i: nucleus mass to keep, in (0, 1] (default: the export's)")
    add("--t2i-samples", type=int, default=1, help="images per prompt and scale (default 1)")
    add("--t2i-kinds", default="short,long", help="ShapesWorld caption kinds used as prompts (default short,long)")
    add("--fid-network", help="feature network for FID (directory with config.json + model.safetensors, "
        "or a TorchScript file)")
    add("--images", help="image folder of the real-format files below")
    add("--vqav2-questions", help="VQAv2 question JSON (vqa on real data)")
    add("--vqav2-annotations", help="VQAv2 annotation JSON (the 10 answers per question)")
    add("--llava", help="LLaVA JSON conversations or evaluation JSONL (vqa on real data)")
    add("--coco-captions", help="COCO caption JSON (caption on real data)")
    add("--geneval", help="GenEval-style prompt list JSONL (t2i prompts instead of the split's captions)")
    return parser


def select_tasks(args: argparse.Namespace) -> list[str]:
    names = list(TASKS) if args.tasks.strip() == "all" else [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        problem = f"unknown task {unknown[0]!r}" if unknown else "--tasks is empty"
        raise UserError(f"{problem}; known tasks: {', '.join(TASKS)}")
    for name in names:
        for need in TASKS[name].needs:
            satisfied, how = NEEDS[need]
            if not satisfied(args):
                raise UserError(f"task {name} needs {how}")
    return list(dict.fromkeys(names))


def check_args(args: argparse.Namespace) -> None:
    """Every path exists, numbers are in range, sources do not conflict (before anything loads)."""
    for attr, what, kind in PATHS:
        value = getattr(args, attr)
        if value is None:
            continue
        path, flag = Path(value), "--" + attr.replace("_", "-")
        if not path.exists():
            raise UserError(f"{flag}: {what} not found: {path}")
        if kind == "dir" and not path.is_dir() or kind == "file" and not path.is_file():
            raise UserError(f"{flag}: {path} is not a {'directory' if kind == 'dir' else 'file'}")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--t2i-samples", args.t2i_samples), ("--report-rows", args.report_rows),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.vqav2_questions and args.llava:
        raise UserError("--vqav2-questions and --llava are both vqa sources; give one")
    if args.vqav2_annotations and not args.vqav2_questions:
        raise UserError("--vqav2-annotations needs --vqav2-questions")
    if (args.vqav2_questions or args.llava or args.coco_captions) and not args.images:
        raise UserError("--vqav2-questions, --llava and --coco-captions need --images (their image folder)")
    for template in args.zero_shot_template or []:
        try:
            template.format(colour="red", shape="circle")
        except (KeyError, IndexError, ValueError) as err:
            raise UserError(f"--zero-shot-template {template!r}: only {{colour}} and {{shape}} may be used "
                            f"({type(err).__name__}: {err})") from None
    if args.cfg_scales is not None:
        args.cfg_scale_list = parse_scales(args.cfg_scales)
    args.task_limits = parse_task_limits(args.task_limit or [])
    check_device(args.device)


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--cfg-scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(not s >= 0 for s in scales):
        raise UserError(f"--cfg-scales must be numbers >= 0, got {text!r}")
    return list(dict.fromkeys(scales))


def parse_task_limits(values: list[str]) -> dict[str, int | None]:
    """``["zero_shot=1000", "t2i=all"]`` -> ``{"zero_shot": 1000, "t2i": None}`` (None: no limit)."""
    limits = {}
    for value in values:
        name, sep, number = value.partition("=")
        name, number = name.strip(), number.strip()
        if not sep or name not in TASKS:
            raise UserError(f"--task-limit {value!r}: expected TASK=N with TASK one of {', '.join(TASKS)}")
        if number == "all":
            limits[name] = None
            continue
        try:
            limits[name] = int(number)
        except ValueError:
            raise UserError(f"--task-limit {value!r}: N must be a whole number or 'all'") from None
        if limits[name] < 1:
            raise UserError(f"--task-limit {value!r}: N must be >= 1")
    return limits


def check_out(args: argparse.Namespace, out: Path, names: list[str]) -> None:
    """Earlier answers in --out: continued with --resume (after checking they are this model's),
    refused without it."""
    earlier = [out / "answers" / f"{n}.jsonl" for n in names if TASKS[n].answers]
    if "t2i" in names:
        earlier.append(out / "t2i")
    earlier = [p for p in earlier if p.exists()]
    if earlier and not args.resume:
        raise UserError(f"--out {out} already holds {earlier[0].relative_to(out)} from an earlier run; pass "
                        f"--resume to continue it, or choose another --out")
    model_hash = unified_hash(args.model) if args.model else None
    for path in earlier:
        if path.suffix == ".jsonl":
            AnswerWriter(path, model_hash).close()  # another model's file -> its UserError, now


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def machine_facts(device: str) -> dict:
    """CPU (and the GPU when ``device`` is one): the scores of a budgeted run depend on it."""
    gpu = None
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device))
    return describe(gpu)


def model_facts(ctx: Context) -> dict | None:
    args = ctx.args
    if args.model is None:
        return None
    if "unified" in ctx.__dict__:  # loaded by a task
        loaded = ctx.unified
        return {"dir": str(args.model), "hash": loaded.hash, "tokenizer_hash": loaded.tokenizer_hash,
                "sampler_defaults": loaded.sampler_defaults}
    header = read_unified_header(args.model)
    return {"dir": str(args.model), "hash": unified_hash(args.model),
            "tokenizer_hash": header.get("tokenizer", {}).get("hash"),
            "sampler_defaults": header.get("sampler_defaults")}


def print_summary(results: dict, out: Path) -> None:
    for name, task in results["tasks"].items():
        for metric, value, unit in task["table"]:
            print(f"  {name:15s} {metric:48s} {format_value(value, unit)}")
    print(f"wrote {out / 'results.json'} and {out / 'report.md'} ({results['timings']['total_s']:.1f} s)")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    names = select_tasks(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    check_out(args, out, names)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, out, names)
    if "t2i" in names:
        ctx.cfg_scales = getattr(args, "cfg_scale_list", None) or list(
            dict.fromkeys([1.0, float(ctx.unified.sampler_defaults["cfg_scale"])]))
    started, timings, results_tasks = time.perf_counter(), {}, {}
    for name in names:
        begin = time.perf_counter()
        result = TASKS[name].run(ctx)
        timings[name] = time.perf_counter() - begin
        results_tasks[name] = {"description": TASKS[name].help, "tables": [], "figures": [], "info": {}, **result}
    timings["total_s"] = time.perf_counter() - started
    tokenizer = ctx.standalone_tokenizer if args.tokenizer else None
    config = {k: v for k, v in vars(args).items() if k not in ("cfg_scale_list", "task_limit")}
    results = {
        "format": RESULTS_FORMAT, "tasks": results_tasks,
        "config": {**config, "tasks": names, "cfg_scales": getattr(ctx, "cfg_scales", None)},
        "model": model_facts(ctx),
        "tokenizer": {"dir": str(args.tokenizer), "hash": tokenizer.hash} if tokenizer else None,
        "seeds": {"seed": args.seed, "t2i": "image i of a scale (prompt-major) uses seed + i",
                  "vqa_choice": "random.Random(f'vqa/{seed}/{key}') when --vqa-per-image N"},
        "versions": versions(), "machine": machine_facts(args.device), "timings": timings,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")  # task order kept
    write_report(out, results)
    print_summary(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
