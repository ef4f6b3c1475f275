"""What only the tokenizer trainers share: AdamW parameter groups. The run plumbing they use (atomic files,
checkpoint folders, resume, RNG state, metrics log, devices) lives in :mod:`unigen.runs`, the LR schedule in
:mod:`unigen.training.lr_schedule`; the names below are kept so that old imports work."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from unigen.runs import (
    MetricsLog,
    atomic_write,
    checkpoint_dirs,
    resolve_device,
    rng_state,
    set_rng_state,
    setup_logging,
    write_json,
)
from unigen.training.lr_schedule import lr_at

__all__ = ["MetricsLog", "atomic_write", "checkpoint_dirs", "lr_at", "param_groups", "resolve_device", "rng_state",
           "set_rng_state", "setup_logging", "write_json"]


def param_groups(module: nn.Module, weight_decay: float, no_decay: Callable[[str, nn.Parameter], bool] | None = None):
    """AdamW groups: matrices/conv kernels decay; biases, norms (1-d) and ``no_decay`` names do not.

    (LlamaGen's VQ trainer passed weight decay nowhere, so it never applied.)
    """
    decay, keep = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or (no_decay is not None and no_decay(name, p)):
            keep.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
