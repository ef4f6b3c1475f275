"""The one checkpoint layout of every unigen trainer (the stages and both tokenizers), its writer and reader.

``.../checkpoints/step_XXXXXXX`` holds

  the weights          a stage: model/ (weights + tokenizer in our layout, ``UniGenPipeline.from_pretrained`` reads
                       it), or adapter/ in a LoRA stage (the PEFT adapter + base.json, the frozen base's source);
                       a tokenizer: model.safetensors + config.json (+ tokenizer.json), what ``load_vq`` /
                       ``load_siglip`` read, and train_config.json
  optimizer.pt         optimizer state (gathered in full under FSDP)     | DeepSpeed: accelerate's save_state
                                                                         | files (accelerate/) instead
  rng_<rank>.pt        every RNG of every process
  progress.json        the step, the stage (a stage), and the data position: a tokenizer's epoch and batch (and
                       how many images they index); a stage's in-memory batches are a function of the step
  task.pt              what a task adds, if anything (the VQ: its code-usage window, encoder-output buffer and
                       discriminator)
  data.json            a stage on streamed data: the stream's position and the samples skipped so far

No learning-rate schedule is saved: ``WarmupCosine`` is a function of the step and is set from it before every
step (a ``scheduler.pt`` of an earlier stage checkpoint is ignored). A tokenizer checkpoint of the earlier layout
(``training_state.pt``) is refused in one line.

Every process writes into ``.tmp-step_XXXXXXX`` and rank 0 renames it when all are done (``publish``), so a
folder under its real name is always complete; the oldest beyond ``keep_last`` are deleted. ``stageN/final`` is
written the same way, with ``trained.json`` saying how many of the stage's steps it holds: a stage cut short by
``--max-steps`` is not finished, and ``--resume latest`` continues it. A LoRA stage also writes ``stageN/adapter``
(the adapter alone) and its ``final`` is the merged model.

Every file loads with ``torch.load(weights_only=True)``: resuming a checkpoint never runs code from it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

import unigen.training.lora as lora
from unigen.errors import CheckpointError
from unigen.models.checkpoint import save_model
from unigen.runs import checkpoint_dirs, load_state_file, prune, rng_state, set_rng_state, step_dir_name, writing
from unigen.training.parallel import barrier

__all__ = ["Adapter", "TrainingState", "checkpoint_dirs", "is_complete", "load_checkpoint", "publish",
           "read_optimizer", "read_progress", "read_task_state", "restore_rng", "rng_state", "save_checkpoint",
           "save_final", "set_rng_state", "write_state"]
OPTIMIZER, PROGRESS, TASK_STATE = "optimizer.pt", "progress.json", "task.pt"
TRAINED = "trained.json"  # in stageN/final: {"stage", "step", "steps"}
DATA = "data.json"  # in a checkpoint of a stage trained from streamed data
OLD_TOKENIZER_STATE = "training_state.pt"  # a tokenizer checkpoint's one state file before this layout


def rng_file(rank: int) -> str:
    return f"rng_{rank}.pt"


# ---- the layout: writer and reader of every trainer --------------------------------------------------------

def publish(root: Path, step: int, write: Callable[[Path], None], *, keep_last: int, rank: int = 0) -> Path:
    """``write(tmp)`` on every process into ``root/.tmp-step_XXXXXXX``; then rank 0 renames it ``step_XXXXXXX``
    and deletes the oldest beyond ``keep_last``: a checkpoint folder is complete or absent."""
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed run left
        tmp.mkdir(parents=True)
    barrier()
    with writing(final, tmp):
        write(tmp)
        _publish(tmp, final, rank)
    if rank == 0:
        prune(root, keep_last)
    return final


def write_state(tmp: Path, *, rank: int, progress: dict, optimizer: dict | None, task: dict | None = None) -> None:
    """The training state beside the weights: this process's RNG; on rank 0 the ``optimizer`` state (None where
    accelerate saved it), what the ``task`` adds and ``progress`` (the step and the data position)."""
    torch.save(rng_state(), tmp / rng_file(rank))
    if rank == 0:
        if optimizer is not None:
            torch.save(optimizer, tmp / OPTIMIZER)
        if task:
            torch.save(task, tmp / TASK_STATE)
        (tmp / PROGRESS).write_text(json.dumps(progress) + "\n")


def refuse_old_layout(path: Path) -> None:
    if (path / OLD_TOKENIZER_STATE).is_file() and not (path / PROGRESS).is_file():
        raise CheckpointError(f"{path} is a tokenizer checkpoint in unigen's earlier layout ({OLD_TOKENIZER_STATE}), "
                              "which this version does not resume: start the run again with overwrite=true, or "
                              "finish it with the unigen version that wrote it")


def read_progress(path: Path, fields: tuple[str, ...] = ("stage", "step")) -> dict:
    """``progress.json`` of a checkpoint, its ``fields`` checked as integers (a stage's: stage and step)."""
    progress = path / PROGRESS
    if not progress.is_file():
        refuse_old_layout(path)
        raise CheckpointError(f"{path} is not a training checkpoint (no {PROGRESS}); pass 'latest' or a "
                              ".../checkpoints/step_XXXXXXX folder")
    try:
        info = json.loads(progress.read_text())
        if "stage" in fields and "stage" not in info:
            raise CheckpointError(f"{path} is a tokenizer's checkpoint, not a stage's; pass a "
                                  "OUTPUT_DIR/stageN/checkpoints/step_XXXXXXX folder")
        return {**info, **{name: int(info[name]) for name in fields}}
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{progress} is damaged ({type(err).__name__}: {err}); resume from another "
                              "checkpoint") from err


def read_optimizer(path: Path) -> dict:
    return load_state_file(path / OPTIMIZER)


def read_task_state(path: Path) -> dict:
    return load_state_file(path / TASK_STATE) if (path / TASK_STATE).is_file() else {}


def restore_rng(path: Path, rank: int) -> None:
    rng = path / rng_file(rank)
    if rng.is_file():  # a run resumed on more processes than it was saved with keeps fresh RNG on the new ones
        set_rng_state(load_state_file(rng))


# ---- a stage's checkpoints ---------------------------------------------------------------------------------


class Adapter(NamedTuple):
    """A LoRA stage's adapters: the ``PeftModel``, the source of the base it adapts, and whether the final merge
    happens in place. Under FSDP the weights are shards and a QLoRA base is quantized: there the saved adapter is
    folded into a fresh float copy of the base instead (``unigen.training.lora.merge_saved``)."""

    peft_model: object
    base: str
    merge_in_place: bool = True


@dataclass
class TrainingState:
    """What a stage checkpoint saves and restores, and how it is spread over processes: the wrapped training
    module (DDP/FSDP/DeepSpeed) and the model inside it, its processor, the optimizer (as wrapped) and schedule,
    the parallel ``kind`` and this process's ``rank``; ``adapter``: a LoRA stage's adapters, saved instead of the
    whole model; ``data``: streamed data (``state_dict``/``load_state_dict``: its position), or None."""

    wrapped: Any
    model: Any
    processor: Any
    optimizer: Any
    scheduler: Any
    accelerator: Any
    kind: str
    rank: int
    adapter: Adapter | None = None
    data: Any = None


def trained_steps(final: Path) -> tuple[int, int] | None:
    """(steps trained, steps of the stage) recorded with a stage's final weights; None if not recorded."""
    path = final / TRAINED
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        return int(info["step"]), int(info["steps"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is damaged ({err}); delete {final} to train the stage again") from err


def is_complete(final: Path) -> bool:
    """The stage's final weights exist and hold all its steps (not a run cut short by ``--max-steps``)."""
    if not (final / "config.json").is_file():
        return False
    trained = trained_steps(final)
    return trained is None or trained[0] >= trained[1]


class _Weights:
    """What ``save_pretrained`` needs from a model, for a state dict gathered from shards."""

    def __init__(self, state: dict, config):
        self._state, self.config = state, config

    def state_dict(self) -> dict:
        return self._state


def full_model_state(wrapped, model, kind: str) -> dict | None:
    """The unsharded weights (keys as in ``UniGenModel``) on rank 0; ``None`` elsewhere. Collective."""
    if kind != "fsdp":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    state = {k.removeprefix("model."): v for k, v in state.items()}
    for k, v in model.gen_vision_model.state_dict().items():  # the VQ is not sharded (ignored by FSDP)
        state.setdefault(f"gen_vision_model.{k}", v.detach().cpu())
    return {k: state[k] for k in model.state_dict()}  # checkpoint order = the model's


def adapter_state(model, kind: str) -> dict | None:
    """Under FSDP, the trained parameters (adapters, copies of modules_to_save) gathered from their shards, under
    PeftModel's names, on rank 0 (``None`` elsewhere; collective). Elsewhere ``None``: PEFT reads the model."""
    if kind != "fsdp":
        return None
    state = {f"base_model.model.{name}": (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
             for name, p in model.named_parameters() if p.requires_grad}
    return state if torch.distributed.get_rank() == 0 else None


def save_weights(directory: Path, wrapped, model, processor, kind: str, rank: int) -> None:
    state = full_model_state(wrapped, model, kind) if kind == "fsdp" or rank == 0 else None
    if rank == 0:

        save_model(_Weights(state, model.config), directory)
        processor.save_pretrained(directory)


def _publish(tmp: Path, final: Path, rank: int) -> None:
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    barrier()


def _fresh_tmp(tmp: Path, rank: int) -> None:
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    barrier()


def _save_adapter(out: Path, state: TrainingState) -> tuple[Any, str]:
    """``out/adapter``; returns (the merged model, its kind) for the final weights."""
    adapter, rank, kind = state.adapter, state.rank, state.kind
    tmp = out / ".tmp-adapter"
    _fresh_tmp(tmp, rank)
    with writing(out / "adapter", tmp):
        weights = adapter_state(state.model, kind)
        if rank == 0:
            lora.save_adapter(adapter.peft_model, tmp, adapter.base, weights)
        _publish(tmp, out / "adapter", rank)
    if adapter.merge_in_place:
        return lora.merge(adapter.peft_model), kind  # the stage is over
    # a whole float copy, on rank 0 only
    return (lora.merge_saved(adapter.base, out / "adapter") if rank == 0 else None), "single"


def save_final(out: Path, state: TrainingState, *, stage: int, step: int, steps: int) -> Path:
    """``out/final``; a LoRA stage first writes ``out/adapter``, then the merged model as ``final``."""
    model, kind, rank = state.model, state.kind, state.rank
    if state.adapter is not None:
        model, kind = _save_adapter(out, state)
    final, tmp = out / "final", out / ".tmp-final"
    _fresh_tmp(tmp, rank)
    with writing(final, tmp):
        save_weights(tmp, state.wrapped, model, state.processor, kind, rank)
        if rank == 0:
            (tmp / TRAINED).write_text(json.dumps({"stage": stage, "step": step, "steps": steps}) + "\n")
        _publish(tmp, final, rank)
    return final


def save_checkpoint(root: Path, state: TrainingState, *, stage: int, step: int, keep_last: int) -> Path:
    return publish(root, step, lambda tmp: _write_checkpoint(tmp, state, stage, step), keep_last=keep_last,
                   rank=state.rank)


def _write_checkpoint(tmp: Path, state: TrainingState, stage: int, step: int) -> None:
    rank, kind = state.rank, state.kind
    if state.adapter is not None:
        weights = adapter_state(state.model, kind)
        if rank == 0:
            lora.save_adapter(state.adapter.peft_model, tmp / "adapter", state.adapter.base, weights)
    else:
        save_weights(tmp / "model", state.wrapped, state.model, state.processor, kind, rank)
    optim = None
    if kind == "deepspeed":
        state.accelerator.save_state(str(tmp / "accelerate"))
    else:
        optim = _optimizer_state(state.wrapped, state.optimizer, kind)  # collective under FSDP
    write_state(tmp, rank=rank, progress={"stage": stage, "step": step}, optimizer=optim)
    if rank == 0 and state.data is not None:
        (tmp / DATA).write_text(json.dumps(state.data.state_dict()) + "\n")


def _optimizer_state(wrapped, optimizer, kind: str):
    if kind != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_checkpoint(path: Path, state: TrainingState) -> int:
    """Restore optimizer, RNG and the schedule's step in place (the weights were built from ``path/model``); returns
    the step to continue from."""
    if state.kind == "deepspeed":
        state.accelerator.load_state(str(path / "accelerate"))
    else:
        optim = read_optimizer(path)
        if state.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(state.wrapped, state.optimizer, optim,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            state.optimizer.load_state_dict(optim)
    restore_rng(path, state.rank)
    step = int(read_progress(path)["step"])
    load_data_state(path, state.data)
    state.scheduler.set_step(step)
    return step


def load_data_state(path: Path, data) -> None:
    """Streamed data continues from the checkpoint's position; a checkpoint of the other kind of data is named."""
    saved = path / DATA
    streamed = saved.is_file()
    if streamed != (data is not None):
        was, now = ("streamed shards", "a manifest") if streamed else ("a manifest", "streamed shards")
        raise CheckpointError(f"{path} was saved by a run that read {was}, but this run reads {now}; resume with "
                              "the same data=")
    if not streamed:
        return
    try:
        state = json.loads(saved.read_text())
    except ValueError as err:
        raise CheckpointError(f"{saved} is damaged ({err}); resume from another checkpoint") from err
    data.load_state_dict(state)
