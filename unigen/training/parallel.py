"""One process or many: accelerate picks the device and launches DDP or DeepSpeed; FSDP2 sharding is ours.

- single process / DDP: ``accelerator.prepare`` (DDP with ``find_unused_parameters``: a micro-batch may hold
  no sample of some task, leaving its head without gradients on that process).
- DeepSpeed ZeRO-1/2 (``accelerate launch --config_file train/accelerate-deepspeed-zero2.yaml``):
  ``accelerator.prepare`` with our optimizer; ZeRO-3 is refused (it gathers parameters on ``forward`` only,
  and the vision tower's are read outside it).
- FSDP2 (``accelerate launch --config_file train/accelerate-fsdp.yaml``, or ``parallel=fsdp`` under
  torchrun): every unit of ``fsdp_units`` is sharded on its own, so frozen and trainable parameters never
  share a unit; the frozen VQ stays whole on every process (it encodes images outside the training forward).
  In a LoRA stage the adapters (and a ``modules_to_save`` copy) sit in the unit of the layer they adapt, beside its
  frozen weights: FSDP2 shards both and reduces only the gradients that exist.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from unigen.models.param_groups import parameter_groups
from unigen.models.precision import resolve_amp
from unigen.runs import resolve_device

log = logging.getLogger("unigen.training")


def launched() -> bool:
    """Started by a launcher (torchrun, ``accelerate launch``) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_processes(device: str, bf16, grad_accum: int = 1):
    """This process's ``Accelerator``: its device, and the process group of a launched run."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    # accelerate keeps one global state; a new stage (maybe another precision or accumulation) starts it anew
    AcceleratorState._reset_state(reset_partial_state=False)

    # on a machine without CUDA, accelerate only reads torchrun's environment as multi-process with cpu=True
    cpu = resolve_device(device, auto=("cuda",)).type == "cpu"  # device=cuda without CUDA: named
    # "auto": bf16 only where it is native; an AVX2-only CPU emulates it at several times the fp32 cost
    bf16 = resolve_amp(bf16, torch.device("cpu" if cpu else "cuda"), key="bf16")
    return Accelerator(
        cpu=cpu,
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def make_accelerator(recipe, grad_accum: int):
    return start_processes(recipe.device, recipe.bf16, grad_accum)


def strategy(accelerator, recipe=None) -> str:
    """``single``, ``ddp``, ``fsdp`` or ``deepspeed`` (``recipe.parallel=fsdp`` asks for FSDP under torchrun)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise ValueError("unigen shards with FSDP2: set fsdp_version: 2 in the accelerate config")
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        # accelerate on CPU (cpu=True) ignores its FSDP plugin; the launcher's environment still says FSDP
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise ValueError("unigen shards with FSDP2: set fsdp_version: 2 in the accelerate config")
        return "fsdp"
    if recipe is not None and recipe.parallel == "fsdp":
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def fsdp_units(model) -> list[nn.Module]:
    """The modules sharded as FSDP units, children before parents. Each holds one parameter group only, and
    every module the training forward calls directly (outside its parent's ``forward``) is one."""
    if model.cross_attn_layers is not None:
        raise ValueError("FSDP sharding supports fusion: concat (Method A); train Method B with DDP")
    lm = model.language_model
    vision = model.vision_model
    blocks = list(getattr(getattr(vision, "vision_tower", None), "blocks", []))
    return [lm.model.embed_tokens, *lm.model.layers, lm.model.norm, lm.lm_head, *blocks, vision,
            model.aligner, model.gen_embed, model.gen_aligner, model.gen_head]


def shard(step_module: nn.Module, accelerator=None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    kwargs = {}
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is not None:  # launched with an accelerate FSDP config: honour its offload and resharding
        if plugin.cpu_offload is not None and not isinstance(plugin.cpu_offload, bool):
            kwargs["offload_policy"] = plugin.cpu_offload
        if plugin.reshard_after_forward is not None:
            kwargs["reshard_after_forward"] = bool(plugin.reshard_after_forward)
    model = step_module.model
    for unit in fsdp_units(model):
        fully_shard(unit, **kwargs)
    fully_shard(step_module, ignored_params=set(model.gen_vision_model.parameters()), **kwargs)
    return step_module


def configure_deepspeed(accelerator, cfg, grad_clip: float) -> None:
    ds = accelerator.state.deepspeed_plugin
    config = ds.deepspeed_config
    if int(config.get("zero_optimization", {}).get("stage", 0)) == 3:
        raise ValueError("DeepSpeed ZeRO-3 is not supported (use ZeRO-2, or FSDP to shard parameters)")
    if ds.is_auto("train_micro_batch_size_per_gpu"):
        config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if ds.is_auto("gradient_clipping"):
        config["gradient_clipping"] = grad_clip


def wrap(accelerator, kind: str, step_module: nn.Module, make_optimizer, cfg, grad_clip: float):
    """(wrapped training module, optimizer) for ``kind``; the optimizer is built after sharding."""
    if kind == "fsdp":
        wrapped = shard(step_module, accelerator)
        return wrapped, make_optimizer()
    if kind == "deepspeed":
        configure_deepspeed(accelerator, cfg, grad_clip)
        return accelerator.prepare(step_module, make_optimizer())
    return accelerator.prepare(step_module), make_optimizer()


def clip_gradients(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def log_trainable(model, groups: set[str], stage: int) -> None:
    """One line per parameter group (TRAIN, frozen, or how many of its parameters train: LoRA adapters and
    copies of modules_to_save), then the total."""
    total = trainable = 0
    for name, params in parameter_groups(model).items():
        n = sum(p.numel() for _, p in params)
        t = sum(p.numel() for _, p in params if p.requires_grad) if name in groups else 0
        total, trainable = total + n, trainable + t
        if n:
            state = "TRAIN" if t == n else "frozen" if t == 0 else f"LoRA: {t} trainable"
            log.info("stage %d  %-16s %12d params  %s", stage, name, n, state)
    log.info("stage %d  trainable %d of %d params (%.3f%%)", stage, trainable, total, 100 * trainable / max(total, 1))


def all_reduce_sum(x: torch.Tensor, device) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.to(device)
        torch.distributed.all_reduce(x)
    return x.cpu()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---- data parallel by hand: for tasks that call their model in pieces (the tokenizers) --------------------------

def process_group_size() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def average_gradients(params, loss: torch.Tensor) -> float:
    """DDP's arithmetic without its wrapper: every gradient of ``params`` and the ``loss`` averaged over the
    processes in one all-reduce; returns the averaged loss. A tokenizer task calls its model in pieces (encoder,
    quantizer, decoder, a discriminator frozen for the generator's loss), so there is no one ``forward`` for DDP to
    hook. A parameter without a gradient keeps none (AdamW then skips it, as in one process)."""
    _, world = process_group_size()
    if world == 1:
        return loss.item()
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.detach().reshape(1).float()])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[-1].item()


def average(values: dict[str, float], device) -> dict[str, float]:
    """``values`` averaged over the processes (every process passes the same keys)."""
    _, world = process_group_size()
    if world == 1:
        return values
    summed = all_reduce_sum(torch.tensor(list(values.values()), dtype=torch.float64), device)
    return dict(zip(values, (summed / world).tolist(), strict=True))


class _GatherRows(torch.autograd.Function):
    """All processes' rows in rank order; backward sends each process the gradient every loss gives its rows."""

    @staticmethod
    def forward(ctx, x):
        rank, world = process_group_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.rows = slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)  # gloo has no reduce-scatter: sum everything, keep this process's rows
        return grad[ctx.rows]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The global batch's rows of ``x`` (every process holds as many), this process's carrying their gradient."""
    return x if process_group_size()[1] == 1 else _GatherRows.apply(x)


def gather_objects(items: list) -> list:
    """The global batch's ``items`` (picklable: captions), in rank order."""
    _, world = process_group_size()
    if world == 1:
        return items
    parts = [None] * world
    torch.distributed.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def broadcast_from_main(tensor: torch.Tensor) -> None:
    """``tensor`` as rank 0 holds it, on every process (in place)."""
    if process_group_size()[1] > 1:
        torch.distributed.broadcast(tensor, src=0)
