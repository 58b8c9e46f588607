"""Convert LLaVA conversation JSON or COCO captions JSON (+ an image folder) to webdataset shards.

    python -m unified_mm.data.convert_cli llava --json llava_instruct.json --images coco/train2017 \\
        --out data/llava --image-size 256
    python -m unified_mm.data.convert_cli coco --json captions_val2017.json --images coco/val2017 \\
        --out data/coco --image-size 256 --split val

The library behind it (formats, skip reasons, output layout) is :mod:`unified_mm.data.converters`.
"""
from __future__ import annotations

import argparse
import logging
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from mmcore.errors import UserError, cli_entry
from unified_mm.data.converters import (COCO_FORMAT, CONVERTERS, LLAVA_FORMAT, TEXT_SPLIT_SUFFIX,
                                        ConvertOptions)

EPILOG = """examples:
  python -m unified_mm.data.convert_cli llava --json llava_v1_5_mix665k.json --images data/llava_images \\
      --out data/llava --image-size 256 --workers 8
  python -m unified_mm.data.convert_cli coco --json annotations/captions_train2017.json \\
      --images coco/train2017 --out data/coco --image-size 256
  python -m unified_mm.data.convert_cli coco --json annotations/captions_val2017.json \\
      --images coco/val2017 --out data/coco --image-size 256 --split val --add-split

output: {out}/{split}-NNNNN.tar (one <key>.png + <key>.json per sample, keys {split}-NNNNNN) and
{out}/manifest.json (per split: samples, shards, records read, skipped counts by reason). Images
are RGB, short side resized to --image-size (bicubic) and centre-cropped to a square. Records that
are broken (missing or unreadable image, image path outside --images, bad turns, no captions) are
skipped, counted and the first few of each kind named on stderr. The output directory is written
whole at the end: a failed run leaves nothing behind.
"""

LLAVA_HELP = f"""LLaVA conversation JSON: a list of {{"id", "image" (path under --images; optional),
"conversations": [{{"from": "human"|"gpt", "value": "..."}}, ...]}}. Sample JSON: {{"key",
"source_id", "source_index", "source_image", "conversations": [{{"role": "user"|"assistant",
"text"}}], "image_turn": 0, "image_size"}}, with the <image> placeholder removed (the image goes at
the start of the first user turn). Turns must alternate user/assistant, starting with the user and
ending with the assistant. Records without an image are skipped unless --keep-text-only, which
writes them, JSON only, to split {{split}}{TEXT_SPLIT_SUFFIX}. Manifest format {LLAVA_FORMAT!r}."""

COCO_HELP = f"""COCO captions JSON: {{"images": [{{"id", "file_name"}}], "annotations": [{{"image_id",
"caption"}}]}}. One sample per image: {{"key", "source_id", "source_index", "source_image",
"captions": [...], "image_size"}}; captions stripped, empty ones dropped, images without captions
skipped. Manifest format {COCO_FORMAT!r}."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line :class:`UserError` s (exit 2) like any bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def _common_args() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", required=True, metavar="FILE", help="the dataset's JSON file")
    common.add_argument("--images", required=True, metavar="DIR",
                        help="image folder; image paths in the JSON are relative to it and may not leave it")
    common.add_argument("--out", required=True, metavar="DIR", help="output directory for shards and manifest.json")
    common.add_argument("--image-size", required=True, type=int, metavar="S",
                        help="output images are S x S (e.g. the visual tokenizer's input size)")
    common.add_argument("--split", default="train", help="split name: shards are {split}-NNNNN.tar (train)")
    common.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (1000)")
    common.add_argument("--limit", type=int, metavar="N", help="convert only the first N records")
    common.add_argument("--max-skip-fraction", type=float, default=0.5, metavar="F",
                        help="fail, writing nothing, if more than this fraction of records is skipped (0.5)")
    common.add_argument("--workers", type=int, default=1, metavar="N",
                        help="processes decoding and resizing images (1); output is the same for any N")
    common.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset in --out (with --add-split: replace that split only)")
    common.add_argument("--add-split", action="store_true",
                        help="add --split to the dataset already in --out (same format and image size), "
                             "keeping its other splits")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m unified_mm.data.convert_cli",
                     description="Convert LLaVA conversation or COCO captions JSON plus an image folder "
                                 "to the project's webdataset shards.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{llava,coco}")
    common = _common_args()
    p = sub.add_parser("llava", parents=[common], help="LLaVA-style conversations", description=LLAVA_HELP,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep-text-only", action="store_true",
                   help=f"write records without an image, JSON only, to split {{split}}{TEXT_SPLIT_SUFFIX} "
                        "(default: skip and count them)")
    sub.add_parser("coco", parents=[common], help="COCO-style captions", description=COCO_HELP,
                   epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(image_size=args.image_size, split=args.split, shard_size=args.shard_size,
                          limit=args.limit, max_skip_fraction=args.max_skip_fraction,
                          keep_text_only=getattr(args, "keep_text_only", False), overwrite=args.overwrite,
                          add_split=args.add_split, workers=args.workers, progress=not args.quiet)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("unified_mm.data.converters")
    logger.addHandler(handler)
    try:
        with logging_redirect_tqdm([logger]):  # warnings print above the bar, not through it
            result = CONVERTERS[args.kind](args.json, args.images, args.out, options)
    finally:
        logger.removeHandler(handler)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
