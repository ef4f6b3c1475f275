"""Checks both tokenizer trainers run before any work: numbers that would train nothing or divide by zero,
and the files a trained tokenizer folder holds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unigen.errors import CheckpointError, ConfigError
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


def read_json_object(path: Path) -> dict:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the folder is damaged: train or copy it "
                              "again") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object of config keys, got {type(raw).__name__}")
    return raw


def read_weights(path: Path) -> dict[str, torch.Tensor]:

    if not Path(path).is_file():
        raise CheckpointError(f"{path} is missing; the folder holds no trained weights")
    return _load_safetensors(Path(path))
