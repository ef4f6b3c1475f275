"""Checks both tokenizer trainers run before any work: numbers that would train nothing or divide by zero,
and the files a trained tokenizer folder holds."""

from __future__ import annotations

from pathlib import Path

import torch

from unigen.config_io import build_config
from unigen.data.jsonl import read_json_object
from unigen.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from unigen.models.checkpoint import _load_safetensors

AT_LEAST_ONE = ("steps", "batch_size", "log_every", "eval_every", "save_every", "keep_last")


def check_run_numbers(cfg) -> None:
    for name in AT_LEAST_ONE:
        value = getattr(cfg, name)
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}" + (
                " (a run of no steps would save an untrained model)" if name == "steps" else ""))
    for name in ("warmup_steps", "val_size", "num_workers"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be > 0, got {cfg.lr}")


def read_tokenizer_config(directory: str | Path, model_type: str, config_class, what: str, written_by: str):
    """``config.json`` of a trained tokenizer folder as ``config_class``; its ``model_type`` must match."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} not found: pass a folder written by {written_by}")
    raw = read_json_object(path)
    if raw.pop("model_type", None) != model_type:
        raise CheckpointError(f"{path} is not {what} (model_type must be {model_type!r})")
    return build_config(config_class, raw, str(path))


def read_weights(path: Path) -> dict[str, torch.Tensor]:

    if not Path(path).is_file():
        raise CheckpointError(f"{path} is missing; the folder holds no trained weights")
    return _load_safetensors(Path(path))
