"""Diagnostic: where a stage-1 tokenizer's zero-shot misses are, and which tower loses them.

Zero-shot classifies single-object ShapesWorld images among every colour x shape prompt ("a red
circle"). This script splits the accuracy by size, shape and size x shape, lists the most common
(size, true shape, predicted shape) confusions, and asks which side is short:

* **text prompts**: the usual zero-shot (class embedding = the text tower's prompt embedding);
* **image prototypes**: each class embedding is instead the mean image embedding of that class's
  single-object *training* images. If this is no better than the prompts, the image embedding
  itself does not separate the classes, and better prompts or a better text tower cannot help;
* the mean cosine between each class's prompt embedding and its image prototype (how well aligned
  the two towers are).

    python bench/zero_shot_breakdown.py --tokenizer runs/demo/tokenizer_stage1/export \\
        --data runs/demo/data --split test --prototype-images 4000 --out runs/zs_breakdown.json

Prints a table and writes the figures as JSON to ``--out`` (optional).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmcore.errors import UserError  # noqa: E402
from mmcore.io import atomic_write_text  # noqa: E402
from tokenizer.export import load_tokenizer  # noqa: E402
from tokenizer.zero_shot import class_embeddings  # noqa: E402
from unified_mm.data.pixels import image_to_pixels  # noqa: E402
from unified_mm.data.shards import ShardDataset, resolve_shards  # noqa: E402
from unified_mm.tokenizer_eval import DEFAULT_TEMPLATES, colour_shape_classes, data_config  # noqa: E402


def single_object_samples(data: str, split: str, limit: int | None) -> list:
    """Single-object samples among the first ``limit`` samples of a split (all when None)."""
    dataset = ShardDataset(resolve_shards(data, split), split_by_rank=False)
    return [s for s in islice(dataset, limit) if len(s.meta.get("objects", [])) == 1]


@torch.no_grad()
def image_embeds(model, samples: list, batch_size: int = 200) -> torch.Tensor:
    """(N, E) unit image embeddings of the samples' images."""
    chunks = [torch.stack([image_to_pixels(s.image) for s in samples[i: i + batch_size]])
              for i in range(0, len(samples), batch_size)]
    return torch.cat([model.encode_image_embeds(pixels) for pixels in chunks])


def class_index(sample, classes: list[tuple[str, str]]) -> int:
    obj = sample.meta["objects"][0]
    return classes.index((obj["colour"], obj["shape"]))


def breakdown(samples: list, predictions: list[int], classes: list[tuple[str, str]]) -> dict:
    """Accuracy by size, shape and size/shape, and the shape confusions (size, true, predicted)."""
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    confusions: collections.Counter = collections.Counter()
    for sample, predicted in zip(samples, predictions):
        obj = sample.meta["objects"][0]
        right = classes[predicted] == (obj["colour"], obj["shape"])
        for key in (obj["size"], obj["shape"], f"{obj['size']}/{obj['shape']}"):
            groups[key][0] += right
            groups[key][1] += 1
        if not right:
            confusions[f"{obj['size']} {obj['shape']} -> {classes[predicted][1]}"] += 1
    return {"per_group": {k: {"accuracy": a / n, "n": n} for k, (a, n) in sorted(groups.items())},
            "confusions": dict(confusions.most_common())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tokenizer", required=True, help="stage-1 tokenizer export (with its text tower)")
    parser.add_argument("--data", required=True, help="ShapesWorld dataset directory")
    parser.add_argument("--split", default="test", help="split to classify (default: test)")
    parser.add_argument("--prototype-split", default="train", help="split the image prototypes come from")
    parser.add_argument("--prototype-images", type=int, default=4000,
                        help="samples read from --prototype-split (about a third have one object)")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    try:
        loaded = load_tokenizer(args.tokenizer)
        if loaded.text_tokenizer is None:
            raise UserError(f"{args.tokenizer}: this export has no text tower (a stage-2 export?); "
                            f"zero-shot needs stage 1's")
        model = loaded.model.eval()
        classes = colour_shape_classes(data_config(args.data))
        samples = single_object_samples(args.data, args.split, None)
        references = single_object_samples(args.data, args.prototype_split, args.prototype_images)
        if not samples or not references:
            raise UserError(f"{args.data}: no single-object images in split "
                            f"{args.split if not samples else args.prototype_split}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    prompts = class_embeddings(model, loaded.text_tokenizer, [[t.format(colour=c, shape=s) for t in DEFAULT_TEMPLATES] for c, s in classes])  # (C, E)
    embeds = image_embeds(model, samples)  # (N, E)
    labels = torch.tensor([class_index(s, classes) for s in samples])
    reference_embeds = image_embeds(model, references)
    reference_labels = torch.tensor([class_index(s, classes) for s in references])
    present = [c for c in range(len(classes)) if (reference_labels == c).any()]
    prototypes = F.normalize(torch.stack([reference_embeds[reference_labels == c].mean(0) for c in present]), dim=-1)
    by_prompt = (embeds @ prompts.T).argmax(-1)
    by_prototype = torch.tensor(present)[(embeds @ prototypes.T).argmax(-1)]
    result = {
        "tokenizer": args.tokenizer, "split": args.split, "images": len(samples),
        "prompt_accuracy": float((by_prompt == labels).float().mean()),
        "prototype_accuracy": float((by_prototype == labels).float().mean()),
        "prototype_images": len(references), "prototype_classes": len(present),
        "prompt_prototype_cosine": float((prompts[present] * prototypes).sum(-1).mean()),
        **breakdown(samples, by_prompt.tolist(), classes),
    }
    print(f"{len(samples)} single-object {args.split} images, {len(classes)} classes")
    print(f"  text prompts     {result['prompt_accuracy']:.1%}")
    print(f"  image prototypes {result['prototype_accuracy']:.1%}  ({len(references)} {args.prototype_split} "
          f"images, {len(present)} classes)")
    print(f"  prompt vs prototype cosine {result['prompt_prototype_cosine']:.3f}")
    for key, row in result["per_group"].items():
        print(f"  {key:18s} {row['accuracy']:.1%} ({row['n']})")
    print("  confusions: " + ", ".join(f"{k} x{n}" for k, n in list(result["confusions"].items())[:8]))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
