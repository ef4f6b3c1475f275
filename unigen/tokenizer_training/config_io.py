"""Typed training configs from YAML files plus ``key=value`` overrides, with unknown keys named."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml


def _coerce(hint, value, where: str):
    """YAML reads ``1e-3`` as a string and lists for tuples: convert to the field's declared type."""
    args = typing.get_args(hint)
    if value is None or hint is typing.Any:
        return value
    if type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list | tuple):
        item = args[0] if args else typing.Any
        return tuple(_coerce(item, v, where) for v in value)
    try:
        if hint is float and isinstance(value, int | str) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, str):
            return int(value)
    except ValueError as err:
        raise ValueError(f"{where} must be a {hint.__name__}, got {value!r}") from err
    if hint in (int, float, bool, str) and not isinstance(value, hint):
        raise ValueError(f"{where} must be a {hint.__name__}, got {value!r}")
    return value


def build_config(cls: type, values: dict[str, Any], where: str = "config"):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise naming the known ones."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}: {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {unknown}; known keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            value = build_config(hints[name], value, f"{where}.{name}")
        else:
            value = _coerce(hints[name], value, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def config_to_dict(cfg) -> dict[str, Any]:
    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    return {k: (config_to_dict(v) if dataclasses.is_dataclass(v) else plain(v)) for k, v in vars(cfg).items()}


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["vq.codebook_size=512", "steps=100"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. steps=1000 or vq.codebook_size=512)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(cls: type, path: str | Path | None = None, overrides=(), **values):
    """``cls`` from defaults <- YAML file <- keyword values <- ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a YAML mapping of config keys")
    data = _merge(data, values)
    data = _merge(data, parse_overrides(list(overrides)))
    return build_config(cls, data, where=str(path) if path else "config")
