"""One training stage: staged unfreezing (or LoRA adapters, unigen.training.lora), token-normalised losses over
accumulated micro-batches and processes, atomic resumable checkpoints, metrics.jsonl + TensorBoard."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import unigen.training.checkpoints as ckpt
import unigen.training.parallel as parallel
from unigen import runs
from unigen.config_io import config_to_dict
from unigen.data.bad_samples import BadSamples
from unigen.data.checks import check_codes, check_sample_files
from unigen.data.manifest import read_samples
from unigen.errors import ArgumentError, ConfigError, OutputExistsError
from unigen.models.param_groups import parameter_groups, set_trainable, stage_groups
from unigen.runs import setup_logging
from unigen.training import lora as lora_
from unigen.training.batches import BatchBuilder
from unigen.training.lr_schedule import lr_at
from unigen.training.metrics import TrainMetrics
from unigen.training.mixture import check_mixture, share, step_micro_batches, task_pools
from unigen.training.recipe import TASKS, TrainRecipe
from unigen.training.start import load_pretrained, load_start, lora_base, stage_dir, start_source
from unigen.training.step import TrainStep

log = logging.getLogger("unigen.training")

# the parameter groups a task's loss reaches: a task whose groups are all frozen would train nothing
REACHES = {"understanding": {"vision_encoder", "aligner", "llm", "cross_attention"}, "text": {"llm"},
           "generation": {"gen_embed", "gen_aligner", "gen_head", "llm"}}


def make_optimizer(model, groups: set[str], cfg) -> torch.optim.AdamW:
    param_groups = []
    for name, params in parameter_groups(model).items():
        trainable = [p for _, p in params if p.requires_grad]
        if name in groups and trainable:
            mult = float(cfg.lr_mult.get(name, 1.0))
            param_groups.append({"params": trainable, "lr": cfg.lr * mult, "name": name})
    if not param_groups:
        raise ValueError(f"stage trains nothing: groups {sorted(groups)} have no parameters in this model")
    # fused: one kernel for all tensors instead of ~10 ops per tensor (a large share of a small model's step on CPU)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=True)


def make_scheduler(optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_lr_ratio``; each group keeps its multiplier."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, 1.0, cfg.warmup_steps, cfg.steps, "cosine", cfg.min_lr_ratio))


def resolve_resume(resume: str | None, root: Path, overwrite: bool, rank: int) -> Path | None:
    """``None``: a fresh stage; ``"latest"``: the newest checkpoint if any; else that checkpoint folder."""
    if rank == 0:
        runs.remove_partial_writes(root)  # what a killed run was writing
    path = runs.resolve_resume(resume, root, overwrite=overwrite, marker="progress.json", remove=rank == 0,
                               resume_flag="--resume latest")
    if path is not None:
        ckpt.read_progress(path)
    return path


def set_aside_later_stages(recipe: TrainRecipe, stage: int) -> None:
    """Stage ``stage`` trains again, so what later stages trained from its earlier weights no longer follows
    from it: deleted under overwrite=true, else moved beside (``stageN.stale-K``), never silently kept."""
    for later in range(stage + 1, 4):
        folder = stage_dir(recipe, later)
        if not folder.exists():
            continue
        if recipe.overwrite:
            log.warning("overwrite=true: stage %d trains again, so %s (trained from its earlier weights) is deleted",
                        stage, folder)
            shutil.rmtree(folder)
            continue
        aside = next(p for i in itertools.count(1) if not (p := folder.with_name(f"{folder.name}.stale-{i}")).exists())
        folder.rename(aside)
        log.warning("stage %d trains again, so %s no longer follows from it: moved to %s", stage, folder, aside)


def task_weights(counts: torch.Tensor, weighting: str) -> torch.Tensor:
    """What each task's summed token loss is multiplied by in a step's objective (``counts``: the step's
    supervised tokens per task, all processes).

    ``token``: every supervised token weighs the same, so an image's 64 codes outweigh a 9-token caption 7:1.
    ``task``: each task's mean token loss, averaged over the tasks present in the step.
    """
    if weighting == "token":
        return torch.full_like(counts, 1.0 / float(counts.sum()))
    present = counts > 0
    return torch.where(present, 1.0 / (counts.clamp(min=1) * present.sum()), 0.0)


def check_tasks(pools, cfg, groups: set[str], stage: int) -> None:
    check_mixture(pools, cfg.mixture, stage)
    for task, weight in zip(TASKS, cfg.mixture, strict=True):
        if weight > 0 and pools[task] and not REACHES[task] & groups:
            raise ValueError(f"stage {stage}: the mixture gives {task} weight {weight}, but none of the modules its "
                             f"loss reaches ({sorted(REACHES[task])}) trains in this stage; set its weight to 0 or "
                             "unfreeze one")


def write_inputs(recipe: TrainRecipe, stage: int, bad: BadSamples) -> None:
    resolved = json.dumps(config_to_dict(recipe), indent=2) + "\n"
    runs.write_text(Path(recipe.output_dir) / "recipe.json", resolved)
    runs.write_text(stage_dir(recipe, stage) / "recipe.json", resolved)
    bad.write(recipe.output_dir)


def run_stage(recipe: TrainRecipe, stage: int, *, init_from: str | None = None, resume: str | None = None,
              max_steps: int | None = None, progress: bool = True) -> Path:
    """Train one stage; returns ``OUTPUT_DIR/stageN/final`` (a checkpoint the pipeline loads).

    ``resume``: ``"latest"`` (a finished stage is kept as it is; else the newest checkpoint of this stage, if
    any) or a checkpoint folder. ``None`` refuses to replace an earlier run's weights unless ``recipe.overwrite``.
    Everything is checked before anything is written.
    """
    setup_logging()
    cfg = recipe.stage(stage)
    resume = runs.normalize_resume(resume)
    out = stage_dir(recipe, stage)
    final_dir = out / "final"
    if resume == runs.LATEST and ckpt.is_complete(final_dir):
        log.info("stage %d already finished (%s); --resume latest keeps it", stage, final_dir)
        return final_dir
    if resume is None and final_dir.exists() and not recipe.overwrite:
        raise OutputExistsError(f"{final_dir} holds the weights of an earlier run of stage {stage}: pass --resume "
                                f"latest to continue that run (finished stages are kept), overwrite=true to train "
                                f"stage {stage} again (later stages are deleted), or another --output-dir")
    if not recipe.data:
        raise ConfigError("data is empty: set data=PATH (a JSONL manifest or an imagefolder with metadata.jsonl)")
    if max_steps is not None and max_steps < 1:
        raise ArgumentError(f"--max-steps must be at least 1, got {max_steps}")
    accelerator = parallel.make_accelerator(recipe, cfg.grad_accum)
    rank, world = accelerator.process_index, accelerator.num_processes
    kind = parallel.strategy(accelerator, recipe)
    bad = BadSamples(recipe.max_bad_fraction)
    samples, _ = check_sample_files(read_samples(recipe.data), bad)
    ckpt_root = out / "checkpoints"
    resume_from = resolve_resume(resume, ckpt_root, recipe.overwrite, rank)
    base = None  # a LoRA stage: the checkpoint its adapters adapt
    if cfg.lora is not None:
        check_lora_run(cfg.lora, accelerator.device, kind, world, stage)
        base = lora_.read_base(resume_from / "adapter") if resume_from is not None else None
        base = base or lora_base(recipe, stage, init_from)
    elif resume_from is None:
        start_source(recipe, stage, init_from)  # a missing start is named before anything is written
    parallel.barrier()

    if rank > 0:  # rank 0 may train the tokenizer of a fresh model; the others then build the same model
        parallel.barrier()
    if base is not None:
        model, processor = load_pretrained(base)
    elif resume_from is not None:
        model, processor = load_pretrained(resume_from / "model")
    else:
        model, processor = load_start(recipe, stage, samples, init_from)
    if rank == 0:
        parallel.barrier()
    if cfg.lora is not None and cfg.lora.quantize is not None:  # bitsandbytes layers quantize on the move to CUDA
        lora_.quantize_targets(model, cfg.lora, f"stage{stage}.lora",
                               torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32)
    model.to(accelerator.device).train()
    model.language_model.model.gradient_checkpointing = recipe.grad_checkpointing
    peft_model = None
    if cfg.lora is not None:
        torch.manual_seed(recipe.seed)  # the adapters' initial A
        peft_model = lora_.attach(model, cfg.lora, f"stage{stage}.lora")  # freezes everything else
        if resume_from is not None:
            lora_.load_adapter_weights(peft_model, resume_from / "adapter")
        groups = {g for g, (trainable, _) in lora_.trainable_summary(model).items() if trainable}
    else:
        groups = stage_groups(model.config, cfg.groups, cfg.train_llm)
        set_trainable(model, groups)
    adapter = None if peft_model is None else ckpt.Adapter(peft_model, base, kind != "fsdp" and
                                                           cfg.lora.quantize is None)
    vq = model.config.vq  # codes the model's VQ could not have made are bad samples too
    pools = task_pools(check_codes(samples, vq.num_tokens, vq.codebook_size, bad))
    check_tasks(pools, cfg, groups, stage)
    if rank == 0:
        parallel.log_trainable(model, groups, stage)
        log.info("stage %d: %s, %d process(es), global batch %d x %d micro-batch(es)", stage, kind, world,
                 cfg.batch_size * world, cfg.grad_accum)

    builder = BatchBuilder(model, processor, recipe.question, recipe.max_seq_len)
    pools, bad = builder.skip_unfit(pools, bad)  # too long for max_seq_len: listed in bad_samples.jsonl
    raw = {}

    def optimizer_factory():
        raw["optimizer"] = make_optimizer(model, groups, cfg)
        return raw["optimizer"]

    wrapped, optimizer = parallel.wrap(accelerator, kind, TrainStep(model), optimizer_factory, cfg, recipe.grad_clip)
    scheduler = make_scheduler(raw["optimizer"], cfg)
    start = 0
    if resume_from is not None:
        start = ckpt.load_checkpoint(resume_from, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
                                     accelerator=accelerator, kind=kind, rank=rank)
        if rank == 0:
            log.info("resumed stage %d at step %d from %s", stage, start, resume_from)
    if rank == 0:  # only now that the start (and a checkpoint to resume) has loaded
        set_aside_later_stages(recipe, stage)
        out.mkdir(parents=True, exist_ok=True)
        write_inputs(recipe, stage, bad)
    parallel.barrier()
    metrics = TrainMetrics(Path(recipe.output_dir), stage, recipe.tensorboard) if rank == 0 else None
    if metrics is not None:
        metrics.rewind(start)
    steps = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    last_good = resume_from
    bar = tqdm(range(start, steps), desc=f"stage {stage}", disable=not progress or rank > 0, initial=start,
               total=steps)
    for step in bar:
        t0 = time.perf_counter()
        lr = cfg.lr * scheduler.lr_lambdas[0](step)
        group_lrs = {f"lr_{g['name']}": g["lr"] for g in raw["optimizer"].param_groups}
        micro = step_micro_batches(pools, cfg.mixture, seed=recipe.seed, stage=stage, step=step,
                                   size=cfg.batch_size * world, grad_accum=cfg.grad_accum,
                                   caption_dropout=recipe.caption_dropout)
        batches = []
        for picks in micro:
            fill = None
            if kind == "fsdp":  # every process must run the same modules: absent tasks run with weight 0
                fill = {}
                for p in picks:
                    fill.setdefault(p.task, p)
            batches.append(builder.build(share(picks, rank, world), fill))
        local = [[b["tokens"] if (b := mb.get(t)) else 0 for t in TASKS] for mb in batches]
        counts = parallel.all_reduce_sum(torch.tensor(local, dtype=torch.float64).sum(0), accelerator.device)
        total = float(counts.sum())
        weights = task_weights(counts, recipe.loss_weighting)
        # DDP, FSDP and DeepSpeed average gradients over processes and accelerate divides by the accumulation
        # steps: undo both so the update is the gradient of the step's objective, sum(weights * task losses)
        scale = (weights * world * cfg.grad_accum).float().to(accelerator.device)
        sums = torch.zeros(len(TASKS), dtype=torch.float64)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with _sync_context(accelerator, wrapped, kind, last):
                with accelerator.autocast():
                    losses = wrapped(batch)
                bad_loss = parallel.all_reduce_sum(torch.tensor([float(not torch.isfinite(losses).all())]),
                                                   accelerator.device)
                if bad_loss.item():
                    raise FloatingPointError(_nan_message(stage, step, "loss", losses.sum().item(), last_good))
                accelerator.backward((losses * scale).sum())
            sums += losses.detach().double().cpu()
        sums = parallel.all_reduce_sum(sums, accelerator.device)
        if kind == "deepspeed":  # the engine clipped and stepped inside the last backward
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        else:
            grad_norm = parallel.clip_gradients(model, recipe.grad_clip)
            if not torch.isfinite(torch.tensor(grad_norm)):
                raise FloatingPointError(_nan_message(stage, step, "gradient norm", grad_norm, last_good))
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        seconds = time.perf_counter() - t0
        if metrics is not None:
            row = {"loss": float((sums * weights).sum()), "lr": lr}
            row.update({f"loss_{t}": float(sums[k] / counts[k]) for k, t in enumerate(TASKS) if counts[k]})
            row.update(group_lrs)
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            row.update({"tokens": int(total), "tokens_per_s": total / seconds,
                        "samples_per_s": cfg.batch_size * world * cfg.grad_accum / seconds})
            metrics.write(step + 1, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if recipe.save_every and (step + 1) % recipe.save_every == 0 and step + 1 < steps:
            last_good = ckpt.save_checkpoint(
                ckpt_root, stage=stage, step=step + 1, wrapped=wrapped, model=model, processor=processor,
                optimizer=optimizer, scheduler=scheduler, accelerator=accelerator, kind=kind, rank=rank,
                keep_last=recipe.keep_last, adapter=adapter)
    done = max(start, steps)
    if done < cfg.steps and not (ckpt_root / runs.step_dir_name(done)).is_dir():
        # cut short by max_steps: the stage is not finished, and --resume latest continues it from here
        ckpt.save_checkpoint(ckpt_root, stage=stage, step=done, wrapped=wrapped, model=model, processor=processor,
                             optimizer=optimizer, scheduler=scheduler, accelerator=accelerator, kind=kind,
                             rank=rank, keep_last=recipe.keep_last, adapter=adapter)
    final = ckpt.save_final(out, wrapped, model, processor, kind, rank, stage=stage, step=done, steps=cfg.steps,
                            adapter=adapter)
    if metrics is not None:
        metrics.close()
        log.info("stage %d done: %s", stage, final)
    return final


def check_lora_run(settings, device, kind: str, world: int, stage: int) -> None:
    where = f"stage{stage}.lora"
    if kind == "deepspeed":
        raise ConfigError(f"{where}: a LoRA stage trains on one process, with DDP (torchrun) or with FSDP "
                          "(parallel=fsdp or train/accelerate-fsdp.yaml), not with DeepSpeed: its checkpoints "
                          "(accelerate's save_state) hold the whole model instead of the adapter, and that path is "
                          "untested with adapters; use FSDP to shard a LoRA stage")
    if settings.quantize is not None and world > 1:
        raise ConfigError(f"{where}.quantize={settings.quantize}: a quantized base (QLoRA) trains on one GPU, one "
                          f"process; this run has {world} ({kind}). Drop {where}.quantize to train LoRA over the "
                          "float base with several processes")
    lora_.check_quantize(settings, device, where)


def _sync_context(accelerator, wrapped, kind: str, last: bool):
    """Gradients are reduced across processes only on the last micro-batch of a step."""
    if kind == "fsdp":
        wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return accelerator.accumulate(wrapped)


def _nan_message(stage: int, step: int, what: str, value, last_good) -> str:
    return (f"stage {stage} step {step}: the {what} is {value}; stopping. The last good checkpoint is "
            f"{last_good or 'none (no checkpoint written yet)'}; lower the learning rate or check the data")
