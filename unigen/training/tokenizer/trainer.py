"""The task base of the tokenizer trainers (``VQTrainer``, ``SigLIPTrainer``): set-up (resume, data, bad-file
report), checkpoints in ``OUTPUT_DIR/checkpoints/step_XXXXXXX`` (the stages' layout, written and read by
``unigen.training.checkpoints``: complete or absent) plus the final weights in ``OUTPUT_DIR``, the metrics log
and the cadences (log, eval, save), all around ``unigen.training.engine.run_loop``. A task gives the model(s), its
data and step, its evaluation, and any extra state a checkpoint must carry.

Under a launcher (``accelerate launch``, torchrun) the processes train data-parallel, as the stages' DDP does:
``batch_size`` is per process, each takes its share of the global batch in one process's order
(``unigen.data.sampler.EpochBatches``), gradients and logged numbers are averaged
(``unigen.training.parallel.average_gradients``), rank 0 evaluates and writes the files, and every process saves
its own ``rng_<rank>.pt``. A task's loss on each process must be one whose mean over the processes is the loss of
the global batch (the SigLIP loss, over all pairs, is scaled to be)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import unigen.training.checkpoints as ckpt
from unigen import runs
from unigen.config_io import config_to_dict
from unigen.data.image_dataset import write_bad_images
from unigen.data.sampler import batch_loader
from unigen.errors import CheckpointError, ConfigError
from unigen.models.precision import resolve_amp
from unigen.training import parallel
from unigen.training.engine import check_finite, clip_gradients, make_scheduler, run_loop
from unigen.training.tokenizer.run_checks import check_run_numbers

log = logging.getLogger("unigen.training.tokenizer")


@dataclass
class TokenizerRunConfig:
    """What both tokenizer trainers' configs hold: data, the optimisation they share and the run's bookkeeping.
    ``VQTrainConfig`` and ``SigLIPTrainConfig`` add their model and losses, and their own defaults."""

    # data: a JSONL manifest {"image": path relative to the manifest, "caption": ...}; the VQ also takes a folder
    data: str = ""
    val_data: str | None = None  # default: hold out ``val_size`` of ``data``
    val_size: int = 256
    cache_images: bool = True
    max_bad_fraction: float = 0.05  # skipped images (listed in bad_samples.jsonl) above this share stop the run
    num_workers: int = 0
    out_dir: str = "runs/tokenizer"
    # optimisation
    steps: int = 10_000
    batch_size: int = 32
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # or "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    amp: bool | str = False  # bf16 autocast: true, false, or "auto" (native bf16 only: CUDA, avx512_bf16/AMX)
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    log_every: int = 20
    eval_every: int = 500
    save_every: int = 1000
    keep_last: int = 2
    tensorboard: bool = False
    resume: str | None = None  # "latest" (newest under out_dir/checkpoints; "auto" also works) or a checkpoint folder
    overwrite: bool = False  # a fresh run may delete an earlier run's checkpoints in out_dir

    def __post_init__(self):
        check_run_numbers(self)


class _NoMetrics:
    """The metrics log of a process other than rank 0: rank 0 writes the run's."""

    def write(self, *args, **kwargs) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """Set-up, resume, checkpoints, cadences and the final save of a task; see the module doc.

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
        if runs.normalize_resume(cfg.resume) not in (None, runs.LATEST):
            ckpt.refuse_old_layout(Path(cfg.resume))
        resume = runs.resolve_resume(cfg.resume, self.ckpt_root, overwrite=cfg.overwrite, marker=ckpt.PROGRESS,
                                     remove=False)
        self.device = self.start_processes()
        self.amp = resolve_amp(cfg.amp, self.device)
        torch.manual_seed(cfg.seed)
        self.train_set, self.val_set = self.build_data()
        self.prepare_output(resume)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.build(resume)
        self.schedulers = [make_scheduler(opt, cfg) for opt in self.optimizers.values()]
        self.step = 0
        self.last_good: Path | None = None
        self.metrics = runs.MetricsLog(self.out_dir, cfg.tensorboard) if self.rank == 0 else _NoMetrics()
        if resume is not None:
            self.load_checkpoint(resume)
        else:
            self.metrics.truncate_after(0)  # a fresh run starts a fresh log
        self.batches = batch_loader(self.train_set, cfg.batch_size, cfg.seed, self.step, cfg.num_workers,
                                    self.rank, self.world)
        self._rate_start = (time.perf_counter(), self.step)

    def start_processes(self) -> torch.device:
        """This process's device; under a launcher, the process group (data-parallel only)."""
        self.rank, self.world = 0, 1
        if not parallel.launched():
            return runs.resolve_device(self.cfg.device, auto=("cuda",))
        accelerator = parallel.start_processes(self.cfg.device, bf16=False)  # the tasks autocast themselves
        kind = parallel.strategy(accelerator)
        if kind not in ("single", "ddp"):
            raise ConfigError(f"{self.desc} trains data-parallel (DDP) under a launcher, not with {kind}: launch it "
                              "without an FSDP or DeepSpeed config (accelerate launch --num_processes N, or torchrun)")
        self.check_launch()
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        return accelerator.device

    def prepare_output(self, resume: Path | None) -> None:
        """Rank 0 clears an earlier run (overwrite=true) and lists the skipped images; the others wait."""
        if self.rank == 0:
            if resume is None and self.cfg.overwrite and runs.checkpoint_dirs(self.ckpt_root):
                log.warning("overwrite=true: deleting the earlier run's checkpoints in %s", self.ckpt_root)
                shutil.rmtree(self.ckpt_root)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_bad_images(self.out_dir, self.train_set, self.val_set)
        parallel.barrier()

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers["optimizer"]

    # -- one update: the loss's gradient, averaged over the processes, clipped, NaN-guarded, applied
    def update(self, loss: torch.Tensor, module: torch.nn.Module, name: str = "optimizer") -> float:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the loss of the global batch: every process stops at the same step
        check_finite(parallel.average_gradients(module.parameters(), loss), self.desc, self.step, "loss",
                     self.last_good)
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
            row = parallel.average(row, self.device)  # the global batch's numbers
            self.metrics.write(step, "train", {**row, **self.log_extra(), "steps_per_s": rate})
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        self.on_step_end()
        if (step % cfg.eval_every == 0 or step == cfg.steps) and self.rank == 0:
            ev = self.evaluate()
            self.metrics.write(step, "eval", ev)
            bar.write(f"step {step}: {self.eval_line(ev)}")
            self.after_eval()
        if step % cfg.save_every == 0 or step == cfg.steps:
            self.save_checkpoint()

    def train(self, steps: int | None = None, before_step: Callable[[], None] | None = None,
              bar_position: int = 0) -> list[dict[str, float]]:
        """Train until ``steps`` (default and at most ``cfg.steps``); returns the per-step rows of this call. The
        full run ends with the final weights in the output folder."""
        until = self.cfg.steps if steps is None else min(steps, self.cfg.steps)
        self._rate_start = (time.perf_counter(), self.step)
        history = run_loop(self, until, desc=self.desc, progress=self.rank == 0, position=bar_position,
                           before_step=before_step)
        if self.step >= self.cfg.steps and self.rank == 0:
            with runs.writing(self.out_dir / "model.safetensors"):  # each file is written atomically
                self.save_weights(self.out_dir)
                runs.write_json(self.out_dir / "train_config.json", config_to_dict(self.cfg))
            log.info("%s: saved to %s", self.desc, self.out_dir)
        parallel.barrier()  # the run is over for every process once its output is complete
        return history

    def run(self, max_steps: int | None = None, **train_args) -> Path:
        """The whole run, or its first ``max_steps`` ending in a checkpoint that ``--resume latest`` continues;
        returns the output folder."""
        self.train(max_steps, **train_args)
        if self.step < self.cfg.steps and not (self.ckpt_root / runs.step_dir_name(self.step)).is_dir():
            self.save_checkpoint()
        self.close()
        return self.out_dir

    def close(self) -> None:
        self.metrics.close()

    # -- checkpoints
    def batches_position(self) -> tuple[int, int]:
        """(epoch, batch) of the next step."""
        return divmod(self.step, len(self.train_set) // (self.cfg.batch_size * self.world))

    def save_checkpoint(self) -> Path:
        epoch, batch = self.batches_position()
        progress = {"step": self.step, "data": {"epoch": epoch, "batch": batch, "train_size": len(self.train_set),
                                                "global_batch": self.cfg.batch_size * self.world}}

        def write(tmp: Path) -> None:
            if self.rank == 0:
                self.save_weights(tmp)
                runs.write_json(tmp / "train_config.json", config_to_dict(self.cfg))
            ckpt.write_state(tmp, rank=self.rank, progress=progress, optimizer=self.optimizer.state_dict(),
                             task=self.extra_state())

        self.last_good = ckpt.publish(self.ckpt_root, self.step, write, keep_last=self.cfg.keep_last, rank=self.rank)
        return self.last_good

    def load_checkpoint(self, path: Path) -> None:
        progress = ckpt.read_progress(path, fields=("step",))
        trained_on = (progress.get("data") or {}).get("train_size")
        if trained_on != len(self.train_set):
            raise CheckpointError(f"cannot resume from {path}: it was trained on {trained_on} {self.what}, "
                                  f"the data now has {len(self.train_set)} (the data order would differ)")
        global_batch = (progress.get("data") or {}).get("global_batch", self.cfg.batch_size)
        if global_batch != self.cfg.batch_size * self.world:
            raise CheckpointError(f"cannot resume from {path}: it was trained at a global batch of {global_batch}, "
                                  f"this run's is {self.cfg.batch_size} x {self.world} process(es) (the data order "
                                  "would differ); resume with as many processes and a batch_size that give the same")
        optimizer, task = ckpt.read_optimizer(path), ckpt.read_task_state(path)  # checked before anything changes
        self.load_weights(path)
        self.optimizer.load_state_dict(optimizer)
        self.load_extra_state(task, path)
        ckpt.restore_rng(path, rank=self.rank)
        self.step = progress["step"]
        self.last_good = path
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    # -- what a task may add
    def check_launch(self) -> None:
        """Refuse what does not train data-parallel (under a launcher, before any work)."""

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
