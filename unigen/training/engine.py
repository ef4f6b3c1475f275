"""The one training loop and what every trainer shares around it.

``run_loop`` drives a task object step by step (every unigen trainer runs through it: the unified model's
stages, ``unigen.training.stage``; the VQ and SigLIP tokenizers, subclasses of ``Trainer``). The pieces every
task uses come from here too: AdamW with the config's betas, the one LR schedule (``WarmupCosine``, set from the
step before every step), gradient clipping and the NaN guard.

``Trainer`` is the single-process task base: set-up (resume, data, bad-file report), checkpoints in
``OUTPUT_DIR/checkpoints/step_XXXXXXX`` (written by ``runs.save_checkpoint_dir``: complete or absent) plus the
final weights in ``OUTPUT_DIR``, the metrics log and the cadences (log, eval, save). A task gives the model(s),
its batches and step, its evaluation, and any extra state a checkpoint must carry. A new task (a preference
stage, say) is one more subclass.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from unigen import runs
from unigen.config_io import config_to_dict
from unigen.errors import CheckpointError, ConfigError
from unigen.models.precision import resolve_amp
from unigen.training.lr_schedule import WarmupCosine
from unigen.training.tokenizer.data import batch_loader, write_bad_images

log = logging.getLogger("unigen.training")

STATE_FILE = "training_state.pt"  # optimizer, data position, RNG, task state: tensors and plain values


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
    bar = tqdm(total=until, initial=task.step, desc=desc, dynamic_ncols=True, mininterval=1.0, position=position,
               disable=not progress)
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
    bar.close()
    return history


# ---- the single-process task base ---------------------------------------------------------------------------

class Trainer:
    """Set-up, resume, checkpoints, cadences and the final save of a single-process task; see the module doc.

    Subclasses set ``desc``, ``what`` (the training items, for messages) and ``no_data`` and implement
    ``build_data``, ``build``, ``train_step``, ``evaluate``, ``eval_line``, ``save_weights`` and ``load_weights``;
    ``extra_state`` / ``load_extra_state`` / ``log_extra`` / ``on_step_end`` / ``after_eval`` when they need them.
    """

    desc = "train"
    what = "samples"
    no_data = "data is empty: set data=PATH"

    def __init__(self, cfg):
        runs.setup_logging()
        if not cfg.data:
            raise ConfigError(self.no_data)
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        # before anything is read or written: a fresh run must not mix with (or replace) an earlier one
        resume = runs.resolve_resume(cfg.resume, self.ckpt_root, overwrite=cfg.overwrite, marker=STATE_FILE,
                                     remove=False)
        self.device = runs.resolve_device(cfg.device, auto=("cuda",))
        self.amp = resolve_amp(cfg.amp, self.device)
        torch.manual_seed(cfg.seed)
        self.train_set, self.val_set = self.build_data()
        if resume is None and cfg.overwrite and runs.checkpoint_dirs(self.ckpt_root):
            log.warning("overwrite=true: deleting the earlier run's checkpoints in %s", self.ckpt_root)
            shutil.rmtree(self.ckpt_root)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_bad_images(self.out_dir, self.train_set, self.val_set)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.build(resume)
        self.schedulers = [make_scheduler(opt, cfg) for opt in self.optimizers.values()]
        self.step = 0
        self.last_good: Path | None = None
        self.metrics = runs.MetricsLog(self.out_dir, cfg.tensorboard)
        if resume is not None:
            self.load_checkpoint(resume)
        else:
            self.metrics.truncate_after(0)  # a fresh run starts a fresh log
        self.batches = batch_loader(self.train_set, cfg.batch_size, cfg.seed, self.step, cfg.num_workers)
        self._rate_start = (time.perf_counter(), self.step)

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers["optimizer"]

    # -- one update: the loss's gradient, clipped, NaN-guarded, applied
    def update(self, loss: torch.Tensor, module: torch.nn.Module, name: str = "optimizer") -> float:
        check_finite(loss.item(), self.desc, self.step, "loss", self.last_good)
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = clip_gradients(module.parameters(), self.cfg.grad_clip)
        check_finite(norm, self.desc, self.step, "gradient norm", self.last_good)
        optimizer.step()
        return norm

    # -- the cadences after every step
    def after_step(self, row: dict[str, float], until: int, bar) -> None:
        cfg, step = self.cfg, self.step
        if step % cfg.log_every == 0 or step == until:
            t0, s0 = self._rate_start
            rate = (step - s0) / max(1e-9, time.perf_counter() - t0)
            self.metrics.write(step, "train", {**row, **self.log_extra(), "steps_per_s": rate})
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        self.on_step_end()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = self.evaluate()
            self.metrics.write(step, "eval", ev)
            bar.write(f"step {step}: {self.eval_line(ev)}")
            self.after_eval()
        if step % cfg.save_every == 0 or step == cfg.steps:
            self.save_checkpoint()

    def train(self, steps: int | None = None, before_step: Callable[[], None] | None = None,
              bar_position: int = 0) -> list[dict[str, float]]:
        """Train until ``steps`` (default ``cfg.steps``); returns the per-step rows of this call. The full run
        ends with the final weights in the output folder."""
        until = self.cfg.steps if steps is None else steps
        self._rate_start = (time.perf_counter(), self.step)
        history = run_loop(self, until, desc=self.desc, position=bar_position, before_step=before_step)
        if self.step >= self.cfg.steps:
            self.save_weights(self.out_dir)
            runs.write_json(self.out_dir / "train_config.json", config_to_dict(self.cfg))
            log.info("%s: saved to %s", self.desc, self.out_dir)
        return history

    def close(self) -> None:
        self.metrics.close()

    # -- checkpoints
    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "train_size": len(self.train_set), "optimizer": self.optimizer.state_dict(),
                 **self.extra_state(), "rng": runs.rng_state()}

        def write(tmp: Path) -> None:
            self.save_weights(tmp)
            torch.save(state, tmp / STATE_FILE)
            runs.write_json(tmp / "train_config.json", config_to_dict(self.cfg))

        self.last_good = runs.save_checkpoint_dir(self.ckpt_root, self.step, write, self.cfg.keep_last)
        return self.last_good

    def load_checkpoint(self, path: Path) -> None:
        state = runs.load_state_file(path / STATE_FILE)
        if state["train_size"] != len(self.train_set):
            raise CheckpointError(f"cannot resume from {path}: it was trained on {state['train_size']} {self.what}, "
                                  f"the data now has {len(self.train_set)} (the data order would differ)")
        self.load_weights(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_extra_state(state, path)
        runs.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.last_good = path
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    # -- what a task may add
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict, path: Path) -> None:
        pass

    def log_extra(self) -> dict[str, float]:
        return {}

    def on_step_end(self) -> None:
        pass

    def after_eval(self) -> None:
        pass
