"""Bench tool (a diagnostic, not a trainer): does the unified model look at the object a question
names? Attention from the answer position to each object's image ids, layer by layer, head by head.

    python bench/lookup_probe.py --model runs/unified/export --codes runs/demo/codes --out lookup.json

On ShapesWorld images with two or three objects, the model reads each colour and shape question of
the val split (one object among several, named by place, size, colour or shape). The object the
question names is the one whose attribute is the answer, kept only when no other object shares it
(so the target is known without parsing the reference). At the ``<assistant>`` position, where the
answer is predicted, each head's attention weights are summed over the image ids of the target
object's patch and, averaged per object, over the other objects' patches.

A head that finds the named object puts more weight on the target than on the others
(``target / other`` well above 1). Weights that are equal on both say the head sees the objects but
not which one the question means: then several-object questions sit at chance however well a
one-object image is read (session 20 found exactly that in demo 27's model).

Beside it, ``--code-table`` says what the codes themselves hold about their cell: the majority
label of each patch code (all of a patch's bits) on the train split, scored on the probed split,
for occupancy, colour, shape and size, by objects in the image. High and flat across object
counts means the codes name each object apart, and a failure to answer is the decoder's.

Needs a tokenizer whose patch is one grid cell (one object per patch: ``configs/tokenizer/
tiny_stage1_cell.yaml``); with smaller patches an object spans several, and the tool refuses.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import collections  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmcore.errors import UserError  # noqa: E402
from unified_mm.export import load_unified  # noqa: E402
from unified_mm.sequence import SequenceBuilder, Turn  # noqa: E402
from unified_mm.tokenizer_cli import read_manifest, read_precomputed  # noqa: E402

GRID = 3  # ShapesWorld's cells per side


def target_questions(meta: dict) -> list[dict]:
    """Colour and shape questions of a several-object image whose answer belongs to one object
    only: ``{question, answer, target: (row, col), others: [(row, col), ...]}``."""
    objects = meta.get("objects", [])
    if len(objects) < 2:
        return []
    rows = []
    for qa in meta.get("qa", []):
        attribute = qa.get("type")
        if attribute not in ("colour", "shape"):
            continue
        holders = [o for o in objects if o[attribute] == qa["answer"]]
        if len(holders) != 1:
            continue
        rows.append({"question": qa["question"], "answer": qa["answer"], "target": tuple(holders[0]["cell"]),
                     "others": [tuple(o["cell"]) for o in objects if o is not holders[0]]})
    return rows


def patch_columns(image_columns: list[int], cell: tuple[int, int], ids_per_patch: int) -> list[int]:
    """Sequence positions of the image ids of the patch at ``cell`` (patches in row-major order)."""
    patch = cell[0] * GRID + cell[1]
    return image_columns[patch * ids_per_patch: (patch + 1) * ids_per_patch]


@torch.no_grad()
def head_weights(model, prompt: list[int]) -> torch.Tensor:
    """Attention weights of the last position: (layers, heads, T)."""
    out = model(torch.tensor([prompt]), output_attentions=True)
    return torch.stack([a[0, :, -1] for a in out.attentions])


def probe(loaded, codes_dir: str, split: str, images: int) -> dict:
    manifest = read_manifest(codes_dir)
    if manifest.get("grid_size") != GRID:
        raise UserError(f"{codes_dir}: grid_size {manifest.get('grid_size')}, this probe needs one "
                        f"ShapesWorld cell per patch ({GRID}x{GRID} patches)")
    model, vocab, tok = loaded.model, loaded.vocab, loaded.text_tokenizer
    model.config._attn_implementation = "eager"  # SDPA returns no weights
    builder = SequenceBuilder(tok, vocab, max_length=model.config.max_position_embeddings)
    ids_per_patch = vocab.tokens_per_image // vocab.num_patches
    targets, others, image_shares = [], [], []  # per question: (layers, heads) attention sums
    for index, (_, codes, meta) in enumerate(read_precomputed(codes_dir, split, None, split_by_rank=False)):
        if index >= images:
            break
        for row in target_questions(meta):
            prompt = builder.chat_prompt([Turn("user", row["question"], torch.as_tensor(codes))])
            image_columns = [j for j, t in enumerate(prompt) if vocab.image_start <= t]
            weights = head_weights(model, prompt)  # (L, H, T)
            targets.append(weights[..., patch_columns(image_columns, row["target"], ids_per_patch)].sum(-1))
            others.append(torch.stack([weights[..., patch_columns(image_columns, c, ids_per_patch)].sum(-1)
                                       for c in row["others"]]).mean(0))
            image_shares.append(weights[..., image_columns].sum(-1))
    if not targets:
        raise UserError(f"{codes_dir} ({split}): no colour/shape question about one of several objects "
                        f"in the first {images} images")
    target, other, image = (torch.stack(v).mean(0) for v in (targets, others, image_shares))  # (L, H) each
    heads = []
    for layer in range(target.shape[0]):
        for head in range(target.shape[1]):
            t, o = float(target[layer, head]), float(other[layer, head])
            heads.append({"layer": layer, "head": head, "target": round(t, 4), "other_object": round(o, 4),
                          "image": round(float(image[layer, head]), 4),
                          "target_over_other": round(t / o, 3) if o > 0 else None})
    ratios = [h["target_over_other"] for h in heads if h["target_over_other"] is not None]
    return {"questions": len(targets), "images": images, "split": split, "heads": heads,
            "best_target_over_other": max(ratios) if ratios else None}


def cell_labels(codes, meta: dict):
    """``(patch code, labels, objects in the image)`` per patch; labels: occupancy, and the colour,
    shape and size of the cell's object (None when empty). Patch codes join the groups' ids."""
    codes = np.asarray(codes)  # (patches, groups)
    occupant = {tuple(o["cell"]): o for o in meta["objects"]}
    for patch in range(GRID * GRID):
        obj = occupant.get(divmod(patch, GRID))
        labels = {"occupied": obj is not None, **{a: obj and obj[a] for a in ("colour", "shape", "size")}}
        yield tuple(int(v) for v in codes[patch]), labels, len(meta["objects"])


def majority_table_accuracy(train_rows, eval_rows, part: int | None = None) -> dict:
    """Accuracy of the majority label per code on ``eval_rows``, the labels counted on
    ``train_rows`` (each an iterable of ``(codes (patches, groups), meta)``):
    ``{attribute: {objects: accuracy}}``, colour/shape/size over occupied cells only; a code never
    seen in training counts as wrong. ``part``: None scores a patch's whole code (all its group
    ids), an int one group's id alone: how much each id names by itself, when the language
    model reads a cell as two ids."""
    def key(code: tuple) -> tuple:
        return code if part is None else (code[part],)

    tables = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
    for codes, meta in train_rows:
        for code, labels, _ in cell_labels(codes, meta):
            for attribute, value in labels.items():
                if attribute == "occupied" or labels["occupied"]:
                    tables[attribute][key(code)][value] += 1
    hits = collections.defaultdict(lambda: collections.defaultdict(list))
    for codes, meta in eval_rows:
        for code, labels, objects in cell_labels(codes, meta):
            for attribute, value in labels.items():
                if attribute == "occupied" or labels["occupied"]:
                    seen = tables[attribute].get(key(code))
                    hits[attribute][objects].append(bool(seen) and seen.most_common(1)[0][0] == value)
    return {a: {n: round(sum(v) / len(v), 4) for n, v in sorted(by_n.items())} for a, by_n in hits.items()}


def code_table(codes_dir: str, split: str, images: int, part: int | None = None) -> dict:
    """:func:`majority_table_accuracy` of the train split's codes, scored on ``split``'s first
    ``images`` images."""
    def rows(name: str, limit: int | None):
        for index, (_, codes, meta) in enumerate(read_precomputed(codes_dir, name, None, split_by_rank=False)):
            if limit is not None and index >= limit:
                break
            yield codes, meta

    return majority_table_accuracy(rows("train", None), rows(split, images), part)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="unified export directory")
    parser.add_argument("--codes", required=True, help="precomputed codes of a one-cell-per-patch tokenizer")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=300, help="first N images of the split")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--code-table", action="store_true",
                        help="also score each patch code's majority label (train split) per cell, for the "
                        "whole code and for each of its group ids alone")
    args = parser.parse_args()
    try:
        result = probe(load_unified(args.model), args.codes, args.split, args.images)
        if args.code_table:
            result["code_table"] = code_table(args.codes, args.split, args.images)
            groups = read_manifest(args.codes)["num_groups"]
            result["code_table_by_group"] = {str(g): code_table(args.codes, args.split, args.images, g)
                                             for g in range(groups)}
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result["model"] = args.model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for h in result["heads"]:
        print(f"layer {h['layer']} head {h['head']}: target {h['target']:.3f}, other object "
              f"{h['other_object']:.3f}, all image {h['image']:.3f}")
    print(f"{result['questions']} questions; best target/other ratio {result['best_target_over_other']}")
    tables = {"code table": result.get("code_table", {}),
              **{f"group {g} id alone": t for g, t in result.get("code_table_by_group", {}).items()}}
    for title, table in tables.items():
        for attribute, by_objects in table.items():
            print(f"{title}, {attribute}: " + ", ".join(f"{n} objects {100 * acc:.1f}%" for n, acc in by_objects.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
