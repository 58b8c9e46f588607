"""Command-line front end of an exported QLIP tokenizer (commands: :data:`EXAMPLES`, or --help),
plus :func:`read_precomputed`, which the unified model's training uses to read precomputed codes.

Codes files and precomputed directories record the tokenizer hash, so codes are never decoded or
trained on with another tokenizer. All inputs are checked before anything is written, and outputs
are atomic: files via a temporary sibling, directories whole (a temporary directory, renamed).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
from tqdm import tqdm
from webdataset import TarWriter
from webdataset.utils import pytorch_worker_info

from mmcore.errors import UserError, cli_entry
from mmcore.io import atomic_output_dir, atomic_write_json
from tokenizer.export import LoadedTokenizer, load_tokenizer
from tokenizer.images import (codes_dtype, codes_header, codes_npy_bytes, decode_to_pixels,
                              encode_images, grid_size, image_to_pixels, load_image, png_bytes,
                              read_codes_file, write_codes_file)
from tokenizer.losses import psnr
from tokenizer.zero_shot import class_embeddings, zero_shot_classify
from unified_mm.data.shards import SkipLog, ShardDataset, Sample, resolve_shards

EXAMPLES = """examples (EXPORT = a tokenizer export directory):
  python -m unified_mm.tokenizer_cli encode      --tokenizer EXPORT a.png b.png --out codes.json
  python -m unified_mm.tokenizer_cli decode      --tokenizer EXPORT codes.json --out decoded/
  python -m unified_mm.tokenizer_cli reconstruct --tokenizer EXPORT a.png --out recon/
  python -m unified_mm.tokenizer_cli zero-shot   --tokenizer EXPORT a.png --labels "a red circle" "a blue square"
  python -m unified_mm.tokenizer_cli precompute  --tokenizer EXPORT --data DATA --out CODES_DIR
"""
PRECOMPUTED_FORMAT = "qlip-codes-webdataset/1"    # precompute's manifest
MANIFEST_NAME = "manifest.json"
CODES_FIELD = "codes.npy"
TAR_MTIME, TAR_OWNER = 0, "qlip"                  # fixed, so the same input gives the same bytes


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line :class:`UserError` s like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


# --- Shared helpers ---------------------------------------------------------------------------

def open_tokenizer(args: argparse.Namespace) -> LoadedTokenizer:
    try:
        torch.empty(0, device=args.device)  # an unknown or unavailable device fails here, clearly
    except (RuntimeError, ValueError, AssertionError) as err:
        raise UserError(f"--device {args.device}: {err}") from None
    return load_tokenizer(args.tokenizer, args.device)


def load_images(paths: Iterable[str], tok: LoadedTokenizer) -> torch.Tensor:
    """All images as one (B, 3, S, S) batch; the first bad file stops everything (no output)."""
    size = tok.model.config.encoder.image_size
    return torch.stack([load_image(path, size) for path in paths])


def png_names(sources: Iterable[str]) -> list[str]:
    """``stem.png`` per source, made unique (``stem-1.png``, ...) and stripped of any directory,
    so a codes file can never make decode write outside --out."""
    names, seen = [], set()
    for i, source in enumerate(sources):
        stem = Path(str(source).replace("\\", "/")).stem.lstrip(".") or f"image-{i:05d}"
        name, k = f"{stem}.png", 0
        while name in seen:
            k += 1
            name = f"{stem}-{k}.png"
        seen.add(name)
        names.append(name)
    return names


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to replace a file or a non-empty directory unless --overwrite (before any work)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace it")


def write_png_dir(out: Path, names: list[str], pixels: torch.Tensor) -> None:
    with atomic_output_dir(out) as tmp:
        for name, image in zip(names, pixels):
            (tmp / name).write_bytes(png_bytes(image))


# --- Commands ---------------------------------------------------------------------------------

def cmd_encode(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.suffix not in (".json", ".npz") or out.is_dir():
        raise UserError(f"--out {out}: give a file ending in .json or .npz")
    tok = open_tokenizer(args)
    bits, groups = encode_images(tok.model, load_images(args.images, tok), args.batch_size)
    write_codes_file(out, codes_header(tok.model, tok.hash), args.images, groups,
                     bits if args.bits else None)
    print(f"encoded {len(groups)} images ({groups.shape[1]} tokens x {groups.shape[2]} groups of "
          f"{tok.model.config.bsq.group_size} bits) with tokenizer {tok.hash} -> {out}")


def cmd_decode(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    header, sources, groups = read_codes_file(args.codes)
    tok = open_tokenizer(args)
    if header["tokenizer_hash"] != tok.hash:
        raise UserError(f"{args.codes} was encoded by tokenizer {header['tokenizer_hash']}, but "
                        f"--tokenizer {args.tokenizer} is {tok.hash}; decode with the same tokenizer")
    try:
        pixels = decode_to_pixels(tok.model, groups, args.batch_size)
    except ValueError as err:
        raise UserError(f"{args.codes}: {err}") from None
    write_png_dir(out, png_names(sources), pixels)
    print(f"decoded {len(pixels)} images -> {out}")


def cmd_reconstruct(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    tok = open_tokenizer(args)
    pixels = load_images(args.images, tok)
    _, groups = encode_images(tok.model, pixels, args.batch_size)
    recon = decode_to_pixels(tok.model, groups, args.batch_size)
    names = png_names(args.images)
    write_png_dir(out, names, recon)
    scores = [float(psnr(r[None], p[None])) for r, p in zip(recon, pixels)]
    for source, name, score in zip(args.images, names, scores):
        print(f"{source} -> {out / name}  PSNR {score:.2f} dB")
    print(f"mean PSNR {sum(scores) / len(scores):.2f} dB over {len(scores)} images")


def read_labels(args: argparse.Namespace) -> list[str]:
    """--labels or the lines of --labels-file (blank lines and # comments ignored)."""
    lines = args.labels
    if args.labels_file:
        if not Path(args.labels_file).is_file():
            raise UserError(f"--labels-file not found: {args.labels_file}")
        lines = Path(args.labels_file).read_text(encoding="utf-8").splitlines()
    labels = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if len(labels) < 2:
        raise UserError(f"zero-shot needs at least 2 labels, got {len(labels)}")
    return labels


def cmd_zero_shot(args: argparse.Namespace) -> None:
    labels = read_labels(args)
    tok = open_tokenizer(args)
    if tok.model.text is None or tok.text_tokenizer is None:
        raise UserError(f"tokenizer {args.tokenizer} has no text tower (a stage-2 export?); "
                        "zero-shot needs one that has it, e.g. the stage-1 export")
    pixels = load_images(args.images, tok)
    class_embeds = class_embeddings(tok.model, tok.text_tokenizer, [[label] for label in labels])
    probs = torch.cat([zero_shot_classify(tok.model, chunk, class_embeds).probabilities
                       for chunk in pixels.split(args.batch_size)])
    top = probs.topk(min(args.top_k, len(labels)), dim=-1)
    for source, values, indices in zip(args.images, top.values, top.indices):
        print(f"{source}:")
        for p, i in zip(values.tolist(), indices.tolist()):
            print(f"  {p:6.3f}  {labels[i]}")


# --- precompute: mirror shards with codes, and their reader -----------------------------------

def parse_splits(text: str, data: Path) -> list[str]:
    """Comma list -> split names, each checked to have ``{split}-*.tar`` shards in ``data``."""
    splits = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not splits:
        raise UserError("--splits is empty; give e.g. train,val,test")
    available = sorted({p.name.rsplit("-", 1)[0] for p in data.glob("*-*.tar")})
    for split in splits:
        if split not in available:
            raise UserError(f"unknown split {split!r}: no {split}-*.tar shards in {data} "
                            f"(available: {', '.join(available) or 'none'})")
    return splits


def check_data_image_size(data: Path, split: str, size: int) -> None:
    """Fail fast when the dataset's images are not the tokenizer's size, instead of skipping
    (and warning about) every single sample."""
    first = next(iter(ShardDataset(resolve_shards(data, split))), None)
    if first is not None and first.image.size != (size, size):
        w, h = first.image.size
        raise UserError(f"{first.shard}: images are {w}x{h} but the tokenizer takes {size}x{size} "
                        "(not resized; regenerate the data at the tokenizer's size)")


def _source_count(data: Path, split: str) -> int | None:
    """Sample count from the dataset's manifest (for the progress bar), if it has one."""
    try:
        return int(json.loads((data / MANIFEST_NAME).read_text())["splits"][split]["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_code_shard(tok: LoadedTokenizer, samples: Iterator[Sample], path: Path,
                     batch_size: int, bar: tqdm | None = None) -> int:
    """Encode ``samples`` batch by batch into one mirror shard; returns the samples written.

    The PNG is re-encoded from the decoded pixels (pixel-identical to the source, whatever its
    format) and the JSON re-serialised, so a source with JPEGs still gives lossless mirrors.
    """
    group_size, written = tok.model.config.bsq.group_size, 0
    with open(path, "wb") as stream, TarWriter(stream, user=TAR_OWNER, group=TAR_OWNER,
                                               mtime=TAR_MTIME) as sink:
        while batch := list(islice(samples, batch_size)):
            pixels = torch.stack([image_to_pixels(s.image) for s in batch])
            _, groups = encode_images(tok.model, pixels, batch_size)
            for sample, image, codes in zip(batch, pixels, groups.numpy()):
                meta = json.dumps(sample.meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
                sink.write({"__key__": sample.key, "png": png_bytes(image), "json": meta,
                            CODES_FIELD: codes_npy_bytes(codes, group_size)})
            written += len(batch)
            if bar is not None:
                bar.update(len(batch))
    return written


class ShardJob(NamedTuple):
    split: str
    source: str  # source shard path
    dest: Path  # mirror shard path (same name, in the output directory)


class ShardResult(NamedTuple):
    written: int
    skipped: dict[str, int]  # reason -> count (SkipLog.counts)


def encode_shard(tok: LoadedTokenizer, job: ShardJob, batch_size: int, bar: tqdm | None = None) -> ShardResult:
    skip_log = SkipLog()
    size = tok.model.config.encoder.image_size
    samples = iter(ShardDataset([job.source], image_size=size, skip_log=skip_log))
    written = write_code_shard(tok, samples, job.dest, batch_size, bar)
    return ShardResult(written, dict(skip_log.counts))


# The tokenizer the worker processes encode with: set by the parent before it forks them (the
# model is inherited, not pickled or reloaded).
_WORKER_TOKENIZER: LoadedTokenizer | None = None


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _encode_shard_in_worker(job: ShardJob, batch_size: int) -> ShardResult:
    return encode_shard(_WORKER_TOKENIZER, job, batch_size)


def encode_shards(tok: LoadedTokenizer, jobs: list[ShardJob], batch_size: int, workers: int,
                  bar: tqdm) -> list[ShardResult]:
    """Every job's result, in job order. ``workers`` > 1 forks that many processes (CPU only),
    each encoding whole shards with its share of the CPU threads; the shards are the same bytes
    either way."""
    if workers <= 1 or len(jobs) <= 1:
        return [encode_shard(tok, job, batch_size, bar) for job in jobs]
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_init_worker,
                               initargs=(threads,))
    try:
        futures = {pool.submit(_encode_shard_in_worker, job, batch_size): i for i, job in enumerate(jobs)}
        results: list[ShardResult | None] = [None] * len(jobs)
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(results[futures[future]].written)  # per shard: workers cannot share the bar
        return results
    finally:  # after a failed shard or Ctrl-C, the shards still queued are not started
        pool.shutdown(wait=True, cancel_futures=True)
        _WORKER_TOKENIZER = None


def precompute(tok: LoadedTokenizer, data: Path, splits: list[str], out: Path,
               batch_size: int = 64, progress: bool = True, workers: int = 1) -> dict:
    """Write ``out`` whole (temporary directory renamed at the end); returns its manifest.

    One mirror shard per source shard, with the same name (even if every sample of it was
    skipped, so the shard lists of data and codes always correspond).
    """
    check_data_image_size(data, splits[0], tok.model.config.encoder.image_size)
    device = next(tok.model.parameters()).device
    if workers > 1 and device.type != "cpu":  # a forked child cannot use its parent's CUDA context
        raise UserError(f"{workers} workers fork CPU processes; the tokenizer is on {device}: use 1")
    cfg = tok.model.config.bsq
    with atomic_output_dir(out) as tmp:
        jobs = [ShardJob(split, source, tmp / Path(source).name)
                for split in splits for source in resolve_shards(data, split)]
        counts = [_source_count(data, split) for split in splits]
        total = sum(counts) if None not in counts else None
        with tqdm(total=total, desc=f"precompute {','.join(splits)}", unit="img", disable=not progress) as bar:
            results = encode_shards(tok, jobs, batch_size, workers, bar)
        split_info = {split: split_summary(data, split, [(job, result) for job, result in zip(jobs, results)
                                                         if job.split == split]) for split in splits}
        if (data / "config.yaml").is_file():  # keeps data_config(codes_dir) working for eval
            shutil.copyfile(data / "config.yaml", tmp / "config.yaml")
        manifest = {"format": PRECOMPUTED_FORMAT, "tokenizer_hash": tok.hash, "source": str(data),
                    "grid_size": grid_size(tok.model), "num_bits": cfg.num_bits,
                    "group_size": cfg.group_size, "num_groups": cfg.num_groups,
                    "codes_dtype": codes_dtype(cfg.group_size).name,
                    "fields": ["png", "json", CODES_FIELD], "splits": split_info}
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def split_summary(data: Path, split: str, done: list[tuple[ShardJob, ShardResult]]) -> dict:
    skip_log = SkipLog()  # the shards' counts merged
    for _, result in done:
        skip_log.counts.update(result.skipped)
    samples = sum(result.written for _, result in done)
    if not samples:
        raise UserError(f"split {split!r} of {data} has no usable samples (skipped: {skip_log.summary()})")
    return {"samples": samples, "shards": [job.dest.name for job, _ in done], "skipped": skip_log.summary()}


def cmd_precompute(args: argparse.Namespace) -> None:
    data, out = Path(args.data), Path(args.out)
    if not data.is_dir():
        raise UserError(f"--data directory not found: {data}")
    splits = parse_splits(args.splits, data)
    check_out_dir(out, args.overwrite)
    tok = open_tokenizer(args)
    if pytorch_worker_info()[1] != 1:
        raise UserError("precompute must run in a single process (unset RANK/WORLD_SIZE), "
                        "otherwise each process would see only part of the data")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    manifest = precompute(tok, data, splits, out, args.batch_size, progress=not args.quiet, workers=args.workers)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards, skipped {info['skipped']}")
    print(f"wrote codes of tokenizer {tok.hash} to {out}")


def read_manifest(codes_dir: str | Path) -> dict:
    path = Path(codes_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{codes_dir} is not a precomputed codes directory: missing {MANIFEST_NAME}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: invalid JSON: {err}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PRECOMPUTED_FORMAT:
        raise UserError(f"{path}: not a precomputed codes manifest (format {PRECOMPUTED_FORMAT!r})")
    return manifest


def read_precomputed(codes_dir: str | Path, split: str, expected_hash: str | None = None,
                     **dataset_kwargs) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, group indices (N, G), meta) per sample of a precomputed split.

    Checks happen now, not at the first ``next``: a manifest whose tokenizer hash is not
    ``expected_hash`` (codes from another tokenizer would train the model on the wrong
    vocabulary) or an unknown split is a :class:`UserError`. ``dataset_kwargs`` go to
    :class:`ShardDataset` (``shuffle_buffer``, ``seed``, ``repeat``, ``skip_log``, ...); samples
    with missing or malformed codes are skipped and counted like any bad sample.
    """
    manifest = read_manifest(codes_dir)
    if expected_hash is not None and manifest.get("tokenizer_hash") != expected_hash:
        raise UserError(f"{codes_dir} holds codes of tokenizer {manifest.get('tokenizer_hash')}, "
                        f"expected {expected_hash}; rerun precompute with this tokenizer")
    where = Path(codes_dir) / MANIFEST_NAME
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise UserError(f"{where}: field 'splits' must be an object of split name -> shards")
    if split not in splits:
        raise UserError(f"{codes_dir} has no split {split!r} (has: {', '.join(splits)})")
    names = splits[split].get("shards") if isinstance(splits[split], dict) else None
    # shard names come from a data file: plain file names only, never a path out of codes_dir
    if not isinstance(names, list) or not names or not all(
            isinstance(n, str) and n and Path(n).name == n and n not in (".", "..") and "\\" not in n
            for n in names):
        raise UserError(f"{where}: splits.{split}.shards must be a non-empty list of file names inside "
                        f"{codes_dir}, got {names!r:.200}")
    sizes = {key: manifest.get(key) for key in ("grid_size", "num_groups")}
    bad = [key for key, value in sizes.items() if not isinstance(value, int) or isinstance(value, bool) or value < 1]
    if bad:
        raise UserError(f"{where}: field {bad[0]!r} must be a positive integer, got {sizes[bad[0]]!r}")
    shards = [str(Path(codes_dir) / name) for name in names]
    dataset_kwargs.setdefault("decode_image", False)  # the codes replace the pixels
    dataset = ShardDataset(shards, **dataset_kwargs)
    shape = (sizes["grid_size"] ** 2, sizes["num_groups"])
    return _iter_codes(dataset, shape)


def _iter_codes(dataset: ShardDataset, shape: tuple[int, int]) -> Iterator[tuple[str, np.ndarray, dict]]:
    for sample in dataset:
        try:
            codes = np.load(io.BytesIO(sample.extras[CODES_FIELD]), allow_pickle=False)
        except (KeyError, ValueError, OSError, EOFError) as err:
            dataset.skip_log.skip(sample.shard, sample.key, f"bad codes: {type(err).__name__}: {err}")
            continue
        if codes.shape != shape or codes.dtype.kind not in "iu":
            dataset.skip_log.skip(sample.shard, sample.key, f"bad codes: {codes.dtype} {codes.shape}, "
                                                            f"expected integers of shape {shape}")
            continue
        yield sample.key, codes, sample.meta


# --- Parser and entry point -------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tokenizer", required=True, metavar="EXPORT_DIR",
                        help="tokenizer export directory (config.json + model.safetensors)")
    common.add_argument("--batch-size", type=int, default=64, help="images per forward pass (64)")
    common.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (cpu)")
    overwrite = argparse.ArgumentParser(add_help=False)
    overwrite.add_argument("--overwrite", action="store_true",
                           help="replace an existing non-empty --out directory (whole)")
    parser = _Parser(prog="python -m unified_mm.tokenizer_cli",
                     description="Use an exported QLIP tokenizer: images <-> codes, reconstructions, "
                                 "zero-shot labels, and codes precomputed for a whole dataset. Images "
                                 "must already be the tokenizer's size; outputs are written atomically.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common, *parents])

    p = command("encode", "Encode images to group indices (+ tokenizer hash) in a .json or .npz file.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, metavar="CODES", help="output file, .json or .npz")
    p.add_argument("--bits", action="store_true", help="also store the L bits of every token")
    p.set_defaults(run=cmd_encode)

    p = command("decode", "Decode a codes file from `encode` to PNGs (same tokenizer required).", overwrite)
    p.add_argument("codes", metavar="CODES", help="codes file (.json or .npz) written by encode")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the PNGs")
    p.set_defaults(run=cmd_decode)

    p = command("reconstruct", "Encode and decode images; write PNGs and print PSNR per image.", overwrite)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the PNGs")
    p.set_defaults(run=cmd_reconstruct)

    p = command("zero-shot", "Rank text labels for each image (needs a tokenizer with a text tower).")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", nargs="+", metavar="TEXT", help='e.g. "a red circle" "a blue square"')
    labels.add_argument("--labels-file", metavar="FILE", help="one label per line (# comments)")
    p.add_argument("--top-k", type=int, default=3, help="labels printed per image (3)")
    p.set_defaults(run=cmd_zero_shot)

    p = command("precompute", "Encode dataset splits into mirror shards {split}-NNNNN.tar with png, "
                              "json and codes.npy per sample, plus manifest.json.", overwrite)
    p.add_argument("--data", required=True, metavar="DATA_DIR", help="directory of webdataset shards")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits (train,val,test)")
    p.add_argument("--out", required=True, metavar="CODES_DIR", help="output directory")
    p.add_argument("--workers", type=int, default=1,
                   help="processes encoding whole shards in parallel, CPU only (default 1); the shards "
                        "come out the same bytes either way")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_precompute)
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or getattr(args, "top_k", 1) < 1:
        raise UserError("--batch-size and --top-k must be >= 1")
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
