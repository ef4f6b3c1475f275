"""The learning-rate schedule every unigen trainer uses: linear warm-up, then cosine decay to a floor (or
constant)."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, lr: float, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    from unigen.errors import ConfigError

    raise ConfigError(f"lr_schedule must be 'cosine' or 'constant', got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
