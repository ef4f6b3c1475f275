"""Typed configs (dataclasses) from dicts, YAML files and ``key=value`` overrides: the one builder that
config.json, training recipes and tokenizer-trainer configs go through.

Unknown keys are named with the known ones; values are converted to the field's declared type (YAML reads
``1e-3`` as a string, lists for tuples); a number that is not finite (``nan``, ``inf``) and a missing value
(``data=``) for a field that needs one are refused, naming the key. A section with ``preset: NAME`` starts from
that named model size (unigen.models.presets).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from unigen.errors import ConfigError
from unigen.models.presets import preset


def _number(hint, value, where: str):
    try:
        if hint is float and isinstance(value, int | str) and not isinstance(value, bool):
            value = float(value)
        elif hint is int and isinstance(value, str):
            value = int(value)
    except ValueError as err:
        raise ConfigError(f"{where} must be a {hint.__name__}, got {value!r}") from err
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value}")
    return value


def _coerce(hint, value, where: str):
    args = typing.get_args(hint)
    if hint is typing.Any:
        return value
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where} needs a value (got none, e.g. from '{where.rsplit('.', 1)[-1]}=' with nothing "
                          "after the '=')")
    if type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else _union(inner, value, where)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _union(list(args), value, where)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple and isinstance(value, list | tuple):
        item = args[0] if args else typing.Any
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is list and isinstance(value, list | tuple):
        item = args[0] if args else typing.Any
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        item = args[1] if len(args) == 2 else typing.Any
        return {k: _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if hint in (int, float):
        value = _number(hint, value, where)
    if hint in (int, float, bool, str) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be a {hint.__name__}, got {value!r}")
    return value


def _union(options: list, value, where: str):
    """``bool | str`` and the like: the value's own type when it is one of them (numbers still checked)."""
    for option in options:
        if isinstance(option, type) and isinstance(value, option) and not (option is int and isinstance(value, bool)):
            return _coerce(option, value, where)
    if float in options and isinstance(value, int) and not isinstance(value, bool):
        return _coerce(float, value, where)
    return value


def build_config(cls: type, values: dict[str, Any], where: str = "config"):
    """Build dataclass ``cls`` from a (nested) dict; nested dataclass fields may be dicts or instances."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(values).__name__}: {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, values)) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {unknown}; known keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not dataclasses.is_dataclass(value):
                value = build_config(hint, value, f"{where}.{name}")
        else:
            value = _coerce(hint, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # a dataclass's own validation (__post_init__)
        raise ConfigError(str(err) if where in str(err) or where == "config" else f"{where}: {err}") from err


def config_to_dict(cfg) -> dict[str, Any]:
    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    return {k: (config_to_dict(v) if dataclasses.is_dataclass(v) else plain(v)) for k, v in vars(cfg).items()}


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["vq.codebook_size=512", "steps=100"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. steps=1000 or vq.codebook_size=512)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err.problem or err})") from err
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: the key {key!r} has an empty part")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set to a value above and cannot also have keys")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists() else
                          f"config file {path} is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of config keys, got {type(data).__name__}")
    return data


def expand_presets(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Every section that names a ``preset`` (``model: {preset: shapes}``, ``vq: {preset: shapes}``): the named
    preset's values for that section (:mod:`unigen.models.presets`), with the section's own keys over them."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = expand_presets(value, f"{where}.{key}")
            if "preset" in value:
                own = dict(value)
                name = own.pop("preset")
                if not isinstance(name, str):
                    raise ConfigError(f"{where}.{key}.preset must be a preset name, got {name!r}")
                value = _merge(preset(name, str(key), f"{where}.{key}.preset"), own)
        out[key] = value
    return out


def load_config(cls: type, path: str | Path | None = None, overrides=(), **values):
    """``cls`` from defaults <- YAML file <- keyword values <- ``key=value`` overrides, model presets expanded."""
    where = str(path) if path else "config"
    data: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    data = _merge(data, values)
    data = _merge(data, parse_overrides(list(overrides)))
    return build_config(cls, expand_presets(data, where), where=where)
