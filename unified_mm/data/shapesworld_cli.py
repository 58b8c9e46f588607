"""Write ShapesWorld as webdataset shards.

    python -m unified_mm.data.shapesworld_cli --config configs/data/shapesworld.yaml \\
        --out data/shapesworld [key=value ...]

Output, all byte-identical for the same resolved config:
    {out}/{split}-{shard:05d}.tar   one ``.png`` + ``.json`` per sample, fixed tar mtime/owner
    {out}/config.yaml               the resolved config (reload it with load_config)
    {out}/manifest.json             per split: sample count and shard names (written last, so
                                    its presence means the dataset is complete)
Each shard is written to a temporary file and renamed, so a crash never leaves half a shard.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

from tqdm import tqdm
from webdataset import TarWriter

from mmcore.config import add_config_args, load_config, save_config
from mmcore.errors import UserError, cli_entry
from mmcore.io import atomic_output_path, atomic_write_json
from unified_mm.data.shapesworld import (SPLIT_ORDER, ShapesWorldConfig, generate_split,
                                         meta_to_json_bytes)

TAR_MTIME = 0                 # fixed timestamps (and owner) make the tar bytes reproducible
TAR_OWNER = "shapesworld"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "shapesworld-webdataset/1"
WRITE_ORDER = ("train", "val", "test")  # order shards are written and listed; content is fixed
SHARD_NAME = re.compile(r"(train|val|test)-\d{5}\.tar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unified_mm.data.shapesworld_cli",
        description="Generate the ShapesWorld dataset (coloured shapes on a 3x3 grid, with "
                    "captions and QA) as webdataset tar shards, deterministically from the seed.",
        epilog="example: python -m unified_mm.data.shapesworld_cli --config "
               "configs/data/shapesworld.yaml --out data/shapesworld splits.train=5000 seed=1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory for the shards, config.yaml and manifest.json")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow a non-empty --out; shards of an earlier dataset there that "
                             "the new one does not rewrite are deleted")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _old_shards(out: Path) -> list[str]:
    """Shard names listed by a previous ShapesWorld manifest in ``out`` (none if unreadable)."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        return [name for split in manifest["splits"].values() for name in split["shards"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def prepare_out_dir(out: Path, overwrite: bool) -> list[str]:
    """Check ``out`` and create it; returns the shard names of a dataset already there."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace its dataset")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {out}: {err.strerror}") from None
    return _old_shards(out)


def write_split(cfg: ShapesWorldConfig, split: str, out: Path, progress: bool) -> list[str]:
    """Write one split's shards (``samples_per_shard`` samples each); returns their names."""
    samples = generate_split(cfg, split)
    names = []
    with tqdm(total=cfg.split_size(split), desc=f"shapesworld {split}", unit="img",
              disable=not progress, leave=False) as bar:
        for shard in itertools.count():
            batch = list(itertools.islice(samples, cfg.samples_per_shard))
            if not batch:
                break
            name = f"{split}-{shard:05d}.tar"
            with atomic_output_path(out / name) as tmp, open(tmp, "wb") as stream:
                with TarWriter(stream, user=TAR_OWNER, group=TAR_OWNER, mtime=TAR_MTIME) as sink:
                    for key, png, meta in batch:
                        sink.write({"__key__": key, "png": png, "json": meta_to_json_bytes(meta)})
            names.append(name)
            bar.update(len(batch))
    return names


def write_dataset(cfg: ShapesWorldConfig, out: Path, progress: bool = True,
                  stale: list[str] = ()) -> dict:
    """Shards for every split, then config.yaml, then manifest.json; returns the manifest."""
    splits = {}
    for split in WRITE_ORDER:
        splits[split] = {"samples": cfg.split_size(split), "shards": write_split(cfg, split, out, progress)}
    written = {name for split in splits.values() for name in split["shards"]}
    for name in stale:
        if name not in written and SHARD_NAME.fullmatch(name):  # only our own shard names
            (out / name).unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")
    manifest = {"format": MANIFEST_FORMAT, "seed": cfg.seed, "image_size": cfg.image_size,
                "fields": ["png", "json"], "split_order": list(SPLIT_ORDER), "splits": splits}
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(ShapesWorldConfig, args.config, args.overrides)
    out = Path(args.out)
    stale = prepare_out_dir(out, args.overwrite)
    manifest = write_dataset(cfg, out, progress=not args.quiet, stale=stale)
    counts = ", ".join(f"{s} {v['samples']} ({len(v['shards'])} shards)" for s, v in manifest["splits"].items())
    print(f"wrote ShapesWorld to {out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
