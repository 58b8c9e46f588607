"""Unified model export directories: what training writes and sampling / eval load with nothing else.

Layout of an export directory (DESIGN.md §4)::

    config.json              the LlamaConfig (transformers' own file)
    model.safetensors        every weight (a tied lm_head is stored once, as transformers does)
    generation_config.json   when transformers writes one
    tokenizer.model          the sentencepiece model of the text ids
    unified_mm.json          {"format": "unified-mm/1", "vocab": {...}, "text_tokenizer": {"file",
                             "fingerprint", "vocab_size"}, "tokenizer": {"dir": "qlip", "hash"},
                             "templates_version", "sampler_defaults": {...}, "metadata": {...}}
    qlip/                    a copy of the QLIP tokenizer export (tokenizer.export), so the decoder
                             of the image codes travels with the model

The directory is written atomically (temporary sibling, then rename) and loading is strict: a missing
file, a wrong format string, a vocabulary that disagrees with config.json, a text tokenizer or
bundled QLIP tokenizer that is not the one recorded, missing/extra weight keys or unreadable weights
are errors that name the file and field. Weights are read with safetensors only (no pickle).
:func:`unified_hash` fingerprints config + weights + unified_mm.json; eval and sampling record it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmcore.errors import UserError
from mmcore.io import atomic_output_dir, read_json
from mmcore.text_tokenizer import TextTokenizer
from tokenizer import export as qlip_export
from tokenizer.export import (LoadedTokenizer, load_tokenizer, load_weights, read_export_config,
                              state_key_problems, tokenizer_hash)
from tokenizer.qlip import QLIPConfig
from unified_mm.image_positions import CONFIG_FLAG as IMAGE_POSITIONS_FLAG, install_image_positions
from unified_mm.model import resolve_attention, special_token_ids
from unified_mm.vocab import Vocab

__all__ = [
    "EXPORT_FORMAT", "DEFAULT_SAMPLER", "DEFAULT_TEMPLATES_VERSION", "LoadedUnified", "save_unified",
    "load_unified", "unified_hash", "load_qlip", "read_unified_header",
]

EXPORT_FORMAT = "unified-mm/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_TOKENIZER_FILE = "tokenizer.model"
UNIFIED_FILE = "unified_mm.json"
QLIP_DIR = "qlip"
# Version of the task templates (unified_mm.sequence) the model was trained with; callers pass theirs.
DEFAULT_TEMPLATES_VERSION = "1"
DEFAULT_SAMPLER: dict[str, Any] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 3.0,
                                   "max_new_tokens": 64}


class LoadedUnified(NamedTuple):
    model: LlamaForCausalLM  # eval mode, on the requested device/dtype
    vocab: Vocab
    text_tokenizer: TextTokenizer
    export_dir: Path
    tokenizer_dir: Path  # the bundled QLIP tokenizer export (load it with load_qlip)
    tokenizer_hash: str  # tokenizer.export.tokenizer_hash of tokenizer_dir
    sampler_defaults: dict  # DEFAULT_SAMPLER updated by what the export stored
    metadata: dict  # what training recorded (steps, metrics, data, ...)
    hash: str  # unified_hash(export_dir)


# ---------------------------------------------------------------------------------------------
# Checks shared by save and load
# ---------------------------------------------------------------------------------------------

def _check_sampler(values: Any, source: str) -> dict[str, Any]:
    """DEFAULT_SAMPLER updated by ``values``; unknown keys and out-of-range values are errors."""
    if values is None:
        return dict(DEFAULT_SAMPLER)
    if not isinstance(values, dict):
        raise UserError(f"{source}: sampler_defaults must be a mapping, got {type(values).__name__}")
    merged = dict(DEFAULT_SAMPLER)
    for key, value in values.items():
        if key not in DEFAULT_SAMPLER:
            raise UserError(f"{source}: unknown sampler default {key!r}; known: {', '.join(DEFAULT_SAMPLER)}")
        integer = key in ("top_k", "max_new_tokens")
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            kind = "an integer" if integer else "a number"
            raise UserError(f"{source}: sampler_defaults.{key} must be {kind}, got {value!r}")
        low_ok = {"temperature": value >= 0, "top_k": value >= 0, "top_p": 0 < value <= 1,
                  "cfg_scale": value >= 0, "max_new_tokens": value >= 1}[key]
        if not low_ok:
            rule = {"temperature": ">= 0", "top_k": ">= 0 (0 = off)", "top_p": "in (0, 1]",
                    "cfg_scale": ">= 0", "max_new_tokens": ">= 1"}[key]
            raise UserError(f"{source}: sampler_defaults.{key} must be {rule}, got {value!r}")
        merged[key] = value if integer else float(value)
    return merged


def _check_qlip_layout(config: QLIPConfig, vocab: Vocab, source: Path) -> None:
    """The QLIP tokenizer's BSQ layout and token grid must be the ones the vocabulary encodes."""
    grid = config.encoder.image_size // config.encoder.patch_size
    mine = (config.bsq.num_bits, config.bsq.group_size, grid)
    theirs = (vocab.num_bits, vocab.code_group_size, vocab.grid_size)
    if mine != theirs:
        raise UserError(f"{source}: tokenizer codes are {mine[0]} bits in groups of {mine[1]} on a "
                        f"{grid}x{grid} grid, but the vocab expects {theirs[0]} bits in groups of "
                        f"{theirs[1]} on a {theirs[2]}x{theirs[2]} grid")


def _check_specials(config: LlamaConfig, vocab: Vocab, source: Path) -> None:
    ids = special_token_ids(vocab)
    for key, name in (("pad_token_id", "<pad>"), ("bos_token_id", "<bos>"), ("eos_token_id", "<eos>")):
        if getattr(config, key, None) != ids[name]:
            raise UserError(f"{source}: {key} is {getattr(config, key, None)!r}, but {name} is id "
                            f"{ids[name]} in the unified vocabulary")


def _alias_keys(model: torch.nn.Module) -> dict[str, str]:
    """State-dict keys that are the same parameter as an earlier key (tied lm_head -> embedding)."""
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
        else:
            seen[id(tensor)] = name
    return aliases


def _model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict key -> full shape; a ZeRO-3 partitioned parameter reports its ``ds_shape``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {k: tuple(getattr(params.get(k), "ds_shape", None) or v.shape)
            for k, v in model.state_dict(keep_vars=True).items()}


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------

def save_unified(model: LlamaForCausalLM, vocab: Vocab, out_dir: str | Path, *,
                 text_tokenizer_path: str | Path, tokenizer_dir: str | Path,
                 state_dict: dict[str, torch.Tensor] | None = None, metadata: dict | None = None,
                 sampler_defaults: dict | None = None, templates_version: str = DEFAULT_TEMPLATES_VERSION,
                 overwrite: bool = False) -> Path:
    """Write ``model`` (or ``state_dict``, e.g. gathered from a ZeRO engine) as an export dir.

    Every input is checked before anything is written; the directory appears whole or not at all.
    An existing non-empty ``out_dir`` is replaced only with ``overwrite=True``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"export path {out_dir} is a file; give a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"export directory {out_dir} is not empty; pass overwrite=True to replace it")
    text = TextTokenizer(text_tokenizer_path)
    if text.vocab_size != vocab.text_vocab_size:
        raise UserError(f"{text_tokenizer_path} has {text.vocab_size} text ids (pieces + specials), but "
                        f"vocab.text_vocab_size is {vocab.text_vocab_size}")
    tokenizer_dir = Path(tokenizer_dir)
    qlip_config, _ = read_export_config(tokenizer_dir)
    if not (tokenizer_dir / qlip_export.WEIGHTS_FILE).is_file():
        raise UserError(f"{tokenizer_dir} is not a tokenizer export: missing {qlip_export.WEIGHTS_FILE}")
    _check_qlip_layout(qlip_config, vocab, tokenizer_dir)
    shapes = _model_shapes(model)
    rows = shapes["model.embed_tokens.weight"][0]
    if state_dict is not None and "model.embed_tokens.weight" in state_dict:
        rows = state_dict["model.embed_tokens.weight"].shape[0]
    if rows != vocab.size or model.config.vocab_size != vocab.size:
        raise UserError(f"model has {rows} embedding rows (config vocab_size {model.config.vocab_size}), "
                        f"but the unified vocabulary has {vocab.size} ids")
    _check_specials(model.config, vocab, Path("model.config"))
    sampler = _check_sampler(sampler_defaults, "save_unified")
    if not isinstance(templates_version, str) or not templates_version:
        raise UserError(f"templates_version must be a non-empty string, got {templates_version!r}")
    metadata = metadata or {}
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as err:
        raise UserError(f"metadata is not JSON-serialisable: {err}") from None
    if state_dict is not None:
        aliases = _alias_keys(model)
        expected = {k: v for k, v in shapes.items() if k not in aliases}
        found = {k: v.shape for k, v in state_dict.items() if k not in aliases}
        problems = state_key_problems(expected, found)
        if problems:
            raise UserError("state_dict does not match the model: " + "; ".join(problems))

    header = {
        "format": EXPORT_FORMAT,
        "vocab": vocab.to_dict(),
        "text_tokenizer": {"file": TEXT_TOKENIZER_FILE, "fingerprint": text.fingerprint,
                           "vocab_size": text.vocab_size},
        "tokenizer": {"dir": QLIP_DIR, "hash": None},
        "templates_version": templates_version,
        "sampler_defaults": sampler,
        "metadata": metadata,
    }
    with atomic_output_dir(out_dir) as tmp:
        # one shard, whatever the size: loading reads exactly model.safetensors
        # (a copy: save_pretrained empties the dict it is given)
        model.save_pretrained(tmp, state_dict=None if state_dict is None else dict(state_dict),
                              max_shard_size="10000GB")
        if not (tmp / WEIGHTS_FILE).is_file():
            written = sorted(p.name for p in tmp.iterdir())
            raise RuntimeError(f"save_pretrained did not write {WEIGHTS_FILE} (wrote {written})")
        shutil.copyfile(text.model_path, tmp / TEXT_TOKENIZER_FILE)
        (tmp / QLIP_DIR).mkdir()
        for name in (qlip_export.CONFIG_FILE, qlip_export.WEIGHTS_FILE, qlip_export.TEXT_TOKENIZER_FILE):
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / QLIP_DIR / name)
        header["tokenizer"]["hash"] = tokenizer_hash(tmp / QLIP_DIR)
        (tmp / UNIFIED_FILE).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
    return out_dir


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------

def unified_hash(export_dir: str | Path) -> str:
    """sha256 (first 16 hex digits) over config.json, model.safetensors and unified_mm.json (which
    records the text tokenizer's fingerprint and the bundled QLIP tokenizer's hash)."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE, UNIFIED_FILE):
        path = Path(export_dir) / name
        if not path.is_file():
            raise UserError(f"{export_dir} is not a unified model export: missing {name}")
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _field(header: dict, dotted: str, path: Path, kind: type | tuple[type, ...]) -> Any:
    value: Any = header
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UserError(f"{path}: missing field {dotted!r}")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise UserError(f"{path}: field {dotted!r} has the wrong type ({type(value).__name__})")
    return value


def _plain_name(name: str, dotted: str, path: Path) -> str:
    """A file/dir name inside the export (no separators, no '..')."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UserError(f"{path}: field {dotted!r} must name an entry of the export directory, got {name!r}")
    return name


def read_unified_header(export_dir: str | Path) -> dict:
    """The parsed unified_mm.json of an export, with the format checked (errors name the file)."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise UserError(f"unified model directory not found: {export_dir}")
    path = export_dir / UNIFIED_FILE
    if not path.is_file():
        raise UserError(f"{export_dir} is not a unified model export: missing {UNIFIED_FILE}")
    header = read_json(path)
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise UserError(f"{path}: format is {found!r}, expected {EXPORT_FORMAT!r}")
    return header


def _read_llama_config(path: Path) -> LlamaConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: invalid JSON: {err}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "llama":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise UserError(f"{path}: model_type is {found!r}, expected 'llama'")
    try:
        return LlamaConfig.from_dict(raw)
    except Exception as err:  # noqa: BLE001 -- validators raise many types (StrictDataclassError, ZeroDivisionError)
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2]) if first else type(err).__name__
        raise UserError(f"{path}: not a valid Llama config: {detail}") from None


def load_unified(export_dir: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> LoadedUnified:
    """Rebuild the exported decoder from its config.json, load its weights strictly (eval mode) and
    check that the text tokenizer, vocabulary and bundled QLIP tokenizer are the recorded ones."""
    export_dir = Path(export_dir)
    header = read_unified_header(export_dir)
    source = export_dir / UNIFIED_FILE
    for name in (CONFIG_FILE, WEIGHTS_FILE, TEXT_TOKENIZER_FILE):
        if not (export_dir / name).is_file():
            raise UserError(f"{export_dir} is not a unified model export: missing {name}")
    qlip_dir = export_dir / _plain_name(_field(header, "tokenizer.dir", source, str), "tokenizer.dir", source)
    if not qlip_dir.is_dir():
        raise UserError(f"{export_dir} is not a unified model export: missing {qlip_dir.name}/ "
                        "(the bundled QLIP tokenizer)")

    vocab = Vocab.from_dict(_field(header, "vocab", source, dict), source=f"{source}: vocab")
    config = _read_llama_config(export_dir / CONFIG_FILE)
    if config.vocab_size != vocab.size:
        raise UserError(f"{source}: vocab has {vocab.size} ids, but {export_dir / CONFIG_FILE} has "
                        f"vocab_size {config.vocab_size}")
    _check_specials(config, vocab, export_dir / CONFIG_FILE)

    text_path = export_dir / _plain_name(_field(header, "text_tokenizer.file", source, str),
                                         "text_tokenizer.file", source)
    text = TextTokenizer(text_path)
    recorded = _field(header, "text_tokenizer.fingerprint", source, str)
    if text.fingerprint != recorded:
        raise UserError(f"{text_path}: fingerprint {text.fingerprint} != text_tokenizer.fingerprint "
                        f"{recorded} recorded in {source}")
    recorded_size = _field(header, "text_tokenizer.vocab_size", source, int)
    if text.vocab_size != recorded_size or text.vocab_size != vocab.text_vocab_size:
        raise UserError(f"{text_path}: {text.vocab_size} text ids, but {source} records "
                        f"text_tokenizer.vocab_size {recorded_size} and vocab.text_vocab_size "
                        f"{vocab.text_vocab_size}")

    qlip_config, _ = read_export_config(qlip_dir)
    if not (qlip_dir / qlip_export.WEIGHTS_FILE).is_file():
        raise UserError(f"{qlip_dir} is not a tokenizer export: missing {qlip_export.WEIGHTS_FILE}")
    qlip_hash = tokenizer_hash(qlip_dir)
    recorded = _field(header, "tokenizer.hash", source, str)
    if qlip_hash != recorded:
        raise UserError(f"{qlip_dir}: bundled tokenizer hash {qlip_hash} != tokenizer.hash {recorded} "
                        f"recorded in {source}")
    _check_qlip_layout(qlip_config, vocab, qlip_dir)

    sampler = _check_sampler(header.get("sampler_defaults"), str(source))
    metadata = header.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise UserError(f"{source}: field 'metadata' has the wrong type ({type(metadata).__name__})")

    weights_path = export_dir / WEIGHTS_FILE
    state_dict = load_weights(weights_path)  # safetensors only; corrupt file -> UserError
    # flash-attn only runs in half precision; float32 on CUDA gets sdpa
    attn = resolve_attention("auto", device) if dtype in (torch.float16, torch.bfloat16) else "sdpa"
    model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=attn, dtype=torch.float32)
    if getattr(config, IMAGE_POSITIONS_FLAG, False):
        install_image_positions(model, vocab, special_token_ids(vocab)["<boi>"])
    aliases = _alias_keys(model)
    expected = {k: v for k, v in _model_shapes(model).items() if k not in aliases}
    problems = state_key_problems(expected, {k: v.shape for k, v in state_dict.items()})
    if problems:
        raise UserError(f"{weights_path} does not match its config: " + "; ".join(problems))
    for alias, target in aliases.items():
        state_dict[alias] = state_dict[target]
    model.load_state_dict(state_dict, strict=True)
    del state_dict
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedUnified(model, vocab, text, export_dir, qlip_dir, qlip_hash, sampler, metadata,
                         unified_hash(export_dir))


def load_qlip(loaded: LoadedUnified, device: str | torch.device = "cpu") -> LoadedTokenizer:
    """The bundled QLIP tokenizer (decodes the model's image codes), checked against the recorded hash."""
    tokenizer = load_tokenizer(loaded.tokenizer_dir, device)
    if tokenizer.hash != loaded.tokenizer_hash:
        raise UserError(f"{loaded.tokenizer_dir}: tokenizer hash {tokenizer.hash} != {loaded.tokenizer_hash} "
                        f"recorded in {loaded.export_dir / UNIFIED_FILE} (the directory changed after loading)")
    return tokenizer
