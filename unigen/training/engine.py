"""The one training loop and what every trainer shares around it.

``run_loop`` drives a task object step by step; every unigen trainer runs through it: the unified model's
stages (``unigen.training.stage.StageTask``) and the VQ and SigLIP tokenizers (``unigen.training.tokenizer.trainer
.Trainer`` and its subclasses). A task has ``step``, its ``schedulers``, ``train_step()`` (one optimizer step:
batches, loss, update; returns the step's metrics) and ``after_step()`` (logging, evaluation, checkpoints). The
pieces every task uses come from here too: AdamW with the config's betas, the one LR schedule (``WarmupCosine``,
set from the step before every step), gradient clipping and the NaN guard. A new task (a preference stage, say)
is one more such object.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from tqdm.auto import tqdm

from unigen.training.lr_schedule import WarmupCosine

# ---- what every task uses ----------------------------------------------------------------------------------

def make_adamw(groups, *, lr: float, betas, weight_decay: float = 0.0) -> torch.optim.AdamW:
    # fused: one kernel for all tensors instead of ~10 ops per tensor (a large share of a small model's step on CPU)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)


def make_scheduler(optimizer, cfg, schedule: str | None = None) -> WarmupCosine:
    return WarmupCosine(optimizer, warmup=cfg.warmup_steps, total=cfg.steps,
                        schedule=schedule or getattr(cfg, "lr_schedule", "cosine"), min_ratio=cfg.min_lr_ratio)


def nan_message(where: str, step: int, what: str, value, last_good) -> str:
    return (f"{where} step {step}: the {what} is {value}; stopping. The last good checkpoint is "
            f"{last_good or 'none (no checkpoint written yet)'}; lower the learning rate or check the data")


def check_finite(value: float, where: str, step: int, what: str, last_good) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(nan_message(where, step, what, value, last_good))


def clip_gradients(params, max_norm: float | None) -> float:
    """Clip to ``max_norm`` (0 or None: measure only); the total norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm or math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


# ---- the loop ----------------------------------------------------------------------------------------------

class Task(Protocol):
    step: int  # optimizer steps done
    schedulers: list[WarmupCosine]

    def train_step(self) -> dict[str, float]: ...

    def after_step(self, row: dict[str, float], until: int, bar) -> None: ...


def run_loop(task: Task, until: int, *, desc: str, progress: bool = True, position: int = 0,
             before_step: Callable[[], None] | None = None) -> list[dict[str, float]]:
    """Steps ``task.step .. until``: the LR of each step from the schedule, ``train_step``, then ``after_step``
    (logging, evaluation, checkpoints). Returns the rows ``train_step`` gave. ``before_step`` runs before each
    step (the side-by-side tokenizer trainer changes the thread count there)."""
    history: list[dict[str, float]] = []
    # closed however the loop ends, so an error is printed on a line of its own
    with tqdm(total=until, initial=task.step, desc=desc, dynamic_ncols=True, mininterval=1.0, position=position,
              disable=not progress) as bar:
        while task.step < until:
            if before_step is not None:
                before_step()
            for scheduler in task.schedulers:
                scheduler.set_step(task.step)
            row = task.train_step()
            task.step += 1
            history.append(row)
            bar.update(1)
            task.after_step(row, until, bar)
    return history
