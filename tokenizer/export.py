"""Self-contained tokenizer directories: what training exports and everything else loads.

Layout of an export directory::

    config.json            {"format": "qlip-tokenizer/1", "qlip": <QLIPConfig>, "metadata": {...}}
    model.safetensors      every parameter of the QLIP model (strict: no more, no fewer)
    text_tokenizer.model   the sentencepiece model the text tower was trained with (if it has one)

The directory is written atomically (temporary sibling, then rename) and loading is strict:
a missing file, unreadable weights, or keys/shapes that disagree with the config are errors that
name the file and the first offending keys. :func:`tokenizer_hash` fingerprints config + weights;
precomputed image codes record it so a mismatched tokenizer is caught before training on them.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmcore.config import ConfigError, config_from_dict, config_to_dict
from mmcore.errors import UserError
from mmcore.io import atomic_output_dir, read_json
from mmcore.text_tokenizer import TextTokenizer
from tokenizer.qlip import QLIP, QLIPConfig

EXPORT_FORMAT = "qlip-tokenizer/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_TOKENIZER_FILE = "text_tokenizer.model"


class LoadedTokenizer(NamedTuple):
    model: QLIP
    text_tokenizer: TextTokenizer | None  # None when the export has no text tower
    hash: str  # fingerprint of config + weights (see tokenizer_hash)
    metadata: dict  # what training recorded (stage, steps, metrics, ...)


def save_tokenizer(model: QLIP, out_dir: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None,
                   text_tokenizer_path: str | Path | None = None, metadata: dict | None = None) -> Path:
    """Write ``model`` (or ``state_dict``, e.g. gathered from a ZeRO engine) as an export dir."""
    state_dict = state_dict if state_dict is not None else model.state_dict()
    expected = set(model.state_dict())
    if set(state_dict) != expected:
        missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, extra {extra[:5]}")
    if model.config.text is not None and text_tokenizer_path is None:
        raise ValueError("a model with a text tower needs text_tokenizer_path")
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state_dict.items()}
    header = {"format": EXPORT_FORMAT, "qlip": config_to_dict(model.config), "metadata": metadata or {}}
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
        if model.config.text is not None:
            shutil.copyfile(text_tokenizer_path, tmp / TEXT_TOKENIZER_FILE)
    return out_dir


def tokenizer_hash(export_dir: str | Path) -> str:
    """sha256 (first 16 hex digits) over config.json and model.safetensors."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(Path(export_dir) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def read_export_config(export_dir: str | Path) -> tuple[QLIPConfig, dict]:
    """(QLIPConfig, metadata) of an export directory, with errors naming the file."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise UserError(f"tokenizer directory not found: {export_dir}")
    path = export_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{export_dir} is not a tokenizer export: missing {CONFIG_FILE}")
    header = read_json(path)
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise UserError(f"{path}: format is {found!r}, expected {EXPORT_FORMAT!r} "
                        "(released HF-format QLIP directories cannot be loaded yet: issue 3)")
    if not isinstance(header.get("qlip") or {}, dict):
        raise UserError(f"{path}: field 'qlip' must be an object, got {type(header.get('qlip')).__name__}")
    try:
        config = config_from_dict(QLIPConfig, header.get("qlip") or {}, "qlip")
    except ConfigError as err:
        raise UserError(f"{path}: {err}") from None
    return config, header.get("metadata") or {}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: corrupt or unreadable safetensors file: {err}") from None


def state_key_problems(expected: dict[str, tuple], found: dict[str, tuple]) -> list[str]:
    """What differs between two {key: shape} maps (config vs file): missing, unexpected and
    wrong-shaped keys, each with a count and examples; empty when they match."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} with the wrong shape (e.g. {k}: file {tuple(found[k])}, "
                        f"config {tuple(expected[k])})")
    return problems


def load_state_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the file and keys."""
    problems = state_key_problems({k: v.shape for k, v in model.state_dict().items()},
                                  {k: v.shape for k, v in state_dict.items()})
    if problems:
        raise UserError(f"{source} does not match its config: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def load_tokenizer(export_dir: str | Path, device: str | torch.device = "cpu") -> LoadedTokenizer:
    """Rebuild the exported QLIP from its own config and load its weights strictly (eval mode)."""
    export_dir = Path(export_dir)
    config, metadata = read_export_config(export_dir)
    state_dict = load_weights(export_dir / WEIGHTS_FILE)
    model = QLIP(config)
    load_state_strict(model, state_dict, export_dir / WEIGHTS_FILE)
    text_tokenizer = None
    if config.text is not None:
        text_tokenizer = TextTokenizer(export_dir / TEXT_TOKENIZER_FILE)
        if text_tokenizer.vocab_size > config.text.vocab_size:
            raise UserError(f"{export_dir / TEXT_TOKENIZER_FILE} has {text_tokenizer.vocab_size} ids but the "
                            f"text tower only {config.text.vocab_size}")
    return LoadedTokenizer(model.to(device).eval(), text_tokenizer, tokenizer_hash(export_dir), metadata)
