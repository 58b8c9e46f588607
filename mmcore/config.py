"""Typed configuration: dataclass schemas, YAML files with ``_base_`` inheritance, dotted overrides.

One schema per job lives next to the job as a tree of dataclasses. Values come from YAML files;
a file may name one or more ``_base_`` files (paths relative to itself) that it deep-merges over,
and the command line may add dotted overrides such as ``optim.lr=3e-4``. Every key is checked
against the schema: an unknown key is an error that names the key, where it came from and the
closest valid names. The resolved config is saved next to every run's outputs
(:func:`save_config`) and loading rebuilds the same dataclass tree (:func:`config_from_dict`).

Why not OmegaConf/Hydra: both are fine libraries but neither gives strict dataclass checking of
nested YAML with ``_base_`` chains plus a "did you mean" for unknown keys without a plugin layer;
this module is ~250 lines and has no dependency beyond PyYAML.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mmcore.errors import UserError
from mmcore.io import atomic_write_text

T = TypeVar("T")
BASE_KEY = "_base_"


class ConfigError(UserError):
    """A config file, key or value is invalid; the message names it."""


# ---------------------------------------------------------------------------------------------
# YAML loading with _base_ inheritance
# ---------------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """Return ``base`` updated by ``update``; nested mappings merge, everything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read ``path`` and recursively merge it over its ``_base_`` file(s)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"_base_ cycle: {chain}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a path or a list of paths")
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_tree(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


# ---------------------------------------------------------------------------------------------
# Dotted overrides
# ---------------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 3e-4). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r}: empty key in {dotted!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(tree: dict, overrides: typing.Iterable[str]) -> dict:
    tree = dict(tree)
    for text in overrides:
        keys, value = parse_override(text)
        nested: dict = {}
        cursor = nested
        for key in keys[:-1]:
            cursor[key] = {}
            cursor = cursor[key]
        cursor[keys[-1]] = value
        tree = deep_merge(tree, nested)
    return tree


# ---------------------------------------------------------------------------------------------
# Strict dict -> dataclass conversion
# ---------------------------------------------------------------------------------------------

def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "; valid keys: " + ", ".join(sorted(valid))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    if tp in (dict, list, tuple):  # bare containers: any contents
        tp = {dict: dict[Any, Any], list: list[Any], tuple: tuple[Any, ...]}[tp]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}{detail}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return config_from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_convert(k, key_tp, where): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def config_from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and badly typed values are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}" + _suggest(str(key), fields))
        kwargs[key] = _convert(value, hints[key], path)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field without a default was not given
        raise ConfigError(f"{where or cls.__name__}: {err}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def config_to_dict(cfg: Any) -> dict:
    """Plain-data view of a config tree (tuples become lists so YAML/JSON stay simple)."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(cfg)


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Schema defaults <- YAML file (with its ``_base_`` chain) <- dotted overrides."""
    tree = load_yaml_tree(path) if path is not None else {}
    tree = apply_overrides(tree, overrides)
    return config_from_dict(cls, tree)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); returns the path."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write_text(Path(path), text)


def add_config_args(parser, default: str | None = None) -> None:
    """Standard ``--config FILE`` plus trailing ``key.sub=value`` overrides for an argparse CLI."""
    parser.add_argument("--config", default=default, help="YAML config file (may use _base_)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides applied after the YAML file, e.g. optim.lr=3e-4")
