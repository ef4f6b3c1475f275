"""The unified-model stage as a task of the one loop (``unigen.training.engine.run_loop``): a step's micro-batches
of every task, token-normalised losses over micro-batches and processes, the update, metrics and checkpoints.
Its set-up (start weights, LoRA, parallelism, resume) is ``unigen.training.loop.run_stage``. Its samples come
from the in-memory task pools (``unigen.training.mixture``) or from streamed shards (``unigen.training.streamed``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import unigen.training.checkpoints as ckpt
import unigen.training.parallel as parallel
from unigen.models.moe import moe_metrics
from unigen.models.param_groups import parameter_groups
from unigen.training.batches import BatchBuilder
from unigen.training.engine import make_adamw, nan_message
from unigen.training.lr_schedule import lr_at
from unigen.training.metrics import TrainMetrics
from unigen.training.mixture import share, step_micro_batches
from unigen.training.recipe import TASKS, StageConfig, TrainRecipe
from unigen.training.streamed import StreamedPicks

log = logging.getLogger("unigen.training")


def make_optimizer(model, groups: set[str], cfg: StageConfig) -> torch.optim.AdamW:
    param_groups = []
    for name, params in parameter_groups(model).items():
        trainable = [p for _, p in params if p.requires_grad]
        if name in groups and trainable:
            mult = float(cfg.lr_mult.get(name, 1.0))
            param_groups.append({"params": trainable, "lr": cfg.lr * mult, "name": name})
    if not param_groups:
        raise ValueError(f"stage trains nothing: groups {sorted(groups)} have no parameters in this model")
    return make_adamw(param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def task_weights(counts: torch.Tensor, weighting: str) -> torch.Tensor:
    """What each task's summed token loss is multiplied by in a step's objective (``counts``: the step's
    supervised tokens per task, all processes).

    ``token``: every supervised token weighs the same, so an image's 64 codes outweigh a 9-token caption 7:1.
    ``task``: each task's mean token loss, averaged over the tasks present in the step.
    A step without supervised tokens (streamed data may hold none for the stage) weighs nothing.
    """
    if not counts.any():
        return torch.zeros_like(counts)
    if weighting == "token":
        return torch.full_like(counts, 1.0 / float(counts.sum()))
    present = counts > 0
    return torch.where(present, 1.0 / (counts.clamp(min=1) * present.sum()), 0.0)


def _sync_context(accelerator, wrapped, kind: str, last: bool):
    """Gradients are reduced across processes only on the last micro-batch of a step."""
    if kind == "fsdp":
        wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return accelerator.accumulate(wrapped)


@dataclass
class StageTask:
    recipe: TrainRecipe
    stage: int
    state: ckpt.TrainingState
    builder: BatchBuilder
    pools: dict
    metrics: TrainMetrics | None  # rank 0 only
    ckpt_root: Path
    steps: int  # where this run stops (``--max-steps`` may stop it before the stage's steps)
    step: int = 0
    last_good: Path | None = None
    raw_optimizer: torch.optim.Optimizer | None = None  # the optimizer the schedule sets (DeepSpeed wraps it)
    schedulers: list = field(default_factory=list)
    data: StreamedPicks | None = None  # streamed shards instead of ``pools``
    stand_ins: dict | None = None  # streamed: a weight-0 row of each task, for a share that lacks it

    @property
    def cfg(self) -> StageConfig:
        return self.recipe.stage(self.stage)

    @property
    def world(self) -> int:
        return self.state.accelerator.num_processes

    def micro_batches(self) -> list[dict]:
        """This process's share of the step's micro-batches."""
        if self.data is not None:
            return self.streamed_micro_batches()
        cfg, rank, world = self.cfg, self.state.rank, self.world
        micro = step_micro_batches(self.pools, cfg.mixture, seed=self.recipe.seed, stage=self.stage, step=self.step,
                                   size=cfg.batch_size * world, grad_accum=cfg.grad_accum,
                                   caption_dropout=self.recipe.caption_dropout)
        batches = []
        for picks in micro:
            fill = None
            if self.state.kind == "fsdp":  # every process must run the same modules: absent tasks run with weight 0
                fill = {}
                for p in picks:
                    fill.setdefault(p.task, p)
            batches.append(self.builder.build(share(picks, rank, world), fill))
        return batches

    def streamed_micro_batches(self) -> list[dict]:
        """This process's picks from the stream; a task another process has here and this one lacks runs as a
        stand-in row of weight 0 (and a micro-batch nobody has a sample of runs the stand-in of one task)."""
        micro = self.data.step_picks(self.step)
        local = torch.tensor([[any(p.task == t for p in picks) for t in TASKS] for picks in micro], dtype=torch.float64)
        anywhere = parallel.all_reduce_sum(local.clone(), self.state.accelerator.device)
        batches = []
        for picks, here, there in zip(micro, local, anywhere, strict=True):
            lacking = [t for k, t in enumerate(TASKS) if there[k] and not here[k]]
            if not there.any():
                lacking = [self.data.fallback]
            batches.append(self.builder.build(picks, {t: self.stand_ins[t] for t in lacking}))
        return batches

    def accumulate(self, batches: list[dict], scale: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every micro-batch; the summed task losses of all processes."""
        s, device = self.state, self.state.accelerator.device
        sums = torch.zeros(len(scale), dtype=torch.float64)  # a task's loss each (a preference stage: its STATS)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with _sync_context(s.accelerator, s.wrapped, s.kind, last):
                with s.accelerator.autocast():
                    losses = s.wrapped(batch)
                bad_loss = parallel.all_reduce_sum(torch.tensor([float(not torch.isfinite(losses).all())]), device)
                if bad_loss.item():
                    raise FloatingPointError(self._nan("loss", losses.sum().item()))
                s.accelerator.backward((losses * scale).sum())
            sums += losses.detach().double().cpu()
        return parallel.all_reduce_sum(sums, device)

    def apply_update(self) -> float | None:
        s = self.state
        if s.kind == "deepspeed":  # the engine clipped and stepped inside the last backward
            grad_norm = s.accelerator.clip_grad_norm_(s.model.parameters(), self.recipe.grad_clip)
        else:
            grad_norm = parallel.clip_gradients(s.model, self.recipe.grad_clip)
            if not torch.isfinite(torch.tensor(grad_norm)):
                raise FloatingPointError(self._nan("gradient norm", grad_norm))
            s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def lr_row(self) -> dict[str, float]:
        """The step's learning rate and each parameter group's (set by the schedule before the step)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.steps, "cosine", cfg.min_lr_ratio)
        return {"lr": lr, **{f"lr_{g['name']}": g["lr"] for g in self.raw_optimizer.param_groups}}

    def train_step(self) -> dict[str, float]:
        cfg, t0 = self.cfg, time.perf_counter()
        lrs = self.lr_row()
        batches = self.micro_batches()
        local = [[b["tokens"] if (b := mb.get(t)) else 0 for t in TASKS] for mb in batches]
        counts = parallel.all_reduce_sum(torch.tensor(local, dtype=torch.float64).sum(0),
                                         self.state.accelerator.device)
        total = float(counts.sum())
        if not total and self.state.rank == 0:  # streamed data whose tasks the stage's mixture all weighs 0
            log.warning("stage %d step %d: no sample of the streamed batch trains a task of this stage's mixture %s "
                        "(%s); this step has nothing to learn from", self.stage, self.step + 1, list(cfg.mixture),
                        " : ".join(TASKS))
        weights = task_weights(counts, self.recipe.loss_weighting)
        # DDP, FSDP and DeepSpeed average gradients over processes and accelerate divides by the accumulation
        # steps: undo both so the update is the gradient of the step's objective, sum(weights * task losses)
        scale = (weights * self.world * cfg.grad_accum).float().to(self.state.accelerator.device)
        sums = self.accumulate(batches, scale)
        grad_norm = self.apply_update()
        seconds = time.perf_counter() - t0
        row = {"loss": float((sums * weights).sum()), "lr": lrs.pop("lr")}
        row.update({f"loss_{t}": float(sums[k] / counts[k]) for k, t in enumerate(TASKS) if counts[k]})
        row.update(lrs)
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        row.update(moe_metrics(self.state.model))
        row.update({"tokens": int(total), "tokens_per_s": total / seconds,
                    "samples_per_s": cfg.batch_size * self.world * cfg.grad_accum / seconds})
        return row

    def after_step(self, row: dict[str, float], until: int, bar) -> None:
        if self.metrics is not None:
            self.metrics.write(self.step, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        every = self.recipe.save_every
        if every and self.step % every == 0 and self.step < until:
            self.save_checkpoint(self.step)

    def write_bad_samples(self) -> None:
        """Streamed: the samples every process skipped so far, in the run's bad_samples.jsonl (collective)."""
        if self.data is not None:
            self.data.gather_bad()
            if self.state.rank == 0:
                self.data.bad.write(self.recipe.output_dir)

    def save_checkpoint(self, step: int) -> Path:
        self.write_bad_samples()
        self.last_good = ckpt.save_checkpoint(self.ckpt_root, self.state, stage=self.stage, step=step,
                                              keep_last=self.recipe.keep_last)
        return self.last_good

    def _nan(self, what: str, value) -> str:
        return nan_message(f"stage {self.stage}", self.step, what, value, self.last_good)
