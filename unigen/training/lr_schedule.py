"""The learning-rate schedule every unigen trainer uses: linear warm-up, then cosine decay to a floor (or
constant), as a ``torch.optim.lr_scheduler`` over each parameter group's own base rate."""

from __future__ import annotations

import math

import torch

from unigen.errors import ConfigError

SCHEDULES = ("cosine", "constant")


def lr_at(step: int, lr: float, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    raise ConfigError(f"lr_schedule must be one of {list(SCHEDULES)}, got {schedule!r}")


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Group ``g`` trains step ``s`` at ``lr_at(s, g's base lr, ...)``: a pure function of the step, so a resumed
    run sets it from the step alone (``set_step``) and no schedule state needs saving."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup: int, total: int, schedule: str = "cosine",
                 min_ratio: float = 0.0):
        if schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        self.warmup, self.total, self.schedule, self.min_ratio = warmup, total, schedule, min_ratio
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [lr_at(self.last_epoch, base, self.warmup, self.total, self.schedule, self.min_ratio)
                for base in self.base_lrs]

    def set_step(self, step: int) -> None:
        """The rates of ``step`` (resuming): what ``step`` calls of ``step()`` would have set."""
        self.last_epoch = step
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def current(self) -> float:
        """The first group's rate for the step about to run (the run's ``lr`` metric)."""
        return self.optimizer.param_groups[0]["lr"]
