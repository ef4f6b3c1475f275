"""Pieces shared by the tokenizer trainers: optimiser groups, LR schedule, RNG state, atomic checkpoints,
metrics log."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("unigen.tokenizer_training")


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def lr_at(step: int, lr: float, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, tuple | list) else x


# ---- atomic files and checkpoint folders ---------------------------------------------------

def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def save_checkpoint_dir(root: Path, step: int, write: Callable[[Path], None], keep_last: int) -> Path:
    """``write(tmp_dir)`` then rename to ``root/step_XXXXXXX``: a checkpoint folder is complete or absent."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{7}", p.name))


def resolve_resume(resume: str | None, root: Path, overwrite: bool = False) -> Path | None:
    """``None``: fresh run; ``"auto"``: latest checkpoint under ``root`` if any; else a checkpoint folder.

    A fresh run refuses to mix its checkpoints with an earlier run's unless ``overwrite`` (which deletes them).
    """
    if not resume:
        found = checkpoint_dirs(root)
        if found and not overwrite:
            raise FileExistsError(f"{root} already holds checkpoints of an earlier run (latest {found[-1].name}): "
                                  "pass resume=auto to continue it, overwrite=true to start over, or another out_dir")
        if found:
            shutil.rmtree(root)
        return None
    if resume == "auto":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not (path / "training_state.pt").is_file():
        raise FileNotFoundError(f"resume={resume!r}: no training_state.pt there (pass a {root}/step_XXXXXXX folder)")
    return path


class MetricsLog:
    """Appends one JSON object per call to ``metrics.jsonl`` (and to TensorBoard when asked)."""

    def __init__(self, out_dir: Path, tensorboard: bool = False):
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        row = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the log reads as one run."""
        if not self.path.is_file():
            return
        rows = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write(self.path, lambda p: p.write_text("".join(r + "\n" for r in rows)))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
