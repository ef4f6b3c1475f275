"""One training stage's set-up: where its weights start (a checkpoint, the previous stage, a fresh model, or LoRA
adapters over a base, unigen.training.lora), the processes (unigen.training.parallel), resume, and the run
folder; then the stage trains as a task of the one loop (``unigen.training.stage.StageTask`` in
``unigen.training.engine.run_loop``) and ends in atomic final weights. ``data=`` is a manifest (read whole, into
task pools) or streamed shards (``unigen.data.shards.is_streamed``; ``unigen.training.streamed``)."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import unigen.training.checkpoints as ckpt
import unigen.training.lora as lora_
import unigen.training.parallel as parallel
from unigen import runs
from unigen.config_io import config_to_dict
from unigen.data.bad_samples import BadSamples
from unigen.data.checks import check_codes, check_sample_files
from unigen.data.manifest import read_samples
from unigen.data.shards import is_streamed, list_shards
from unigen.data.stream import ShardStream, text_samples
from unigen.errors import ArgumentError, ConfigError, OutputExistsError
from unigen.models.param_groups import set_trainable, stage_groups
from unigen.runs import setup_logging
from unigen.training.batches import BatchBuilder
from unigen.training.engine import make_scheduler, run_loop
from unigen.training.metrics import TrainMetrics
from unigen.training.mixture import check_mixture, task_pools
from unigen.training.preference_stage import PreferenceTask, preference_pools, preference_step
from unigen.training.recipe import TASKS, TrainRecipe
from unigen.training.stage import StageTask, make_optimizer, task_weights
from unigen.training.start import load_pretrained, load_start, lora_base, stage_dir, start_source
from unigen.training.step import TrainStep
from unigen.training.streamed import StreamBatchBuilder, StreamedPicks, sample_check, stand_ins

__all__ = ["check_lora_run", "make_optimizer", "make_scheduler", "run_stage", "task_weights"]

log = logging.getLogger("unigen.training")

# the parameter groups a task's loss reaches: a task whose groups are all frozen would train nothing
REACHES = {"understanding": {"vision_encoder", "aligner", "llm", "cross_attention"}, "text": {"llm"},
           "generation": {"gen_embed", "gen_aligner", "gen_head", "llm"}}


def resolve_resume(resume: str | None, root: Path, overwrite: bool, rank: int) -> Path | None:
    """``None``: a fresh stage; ``"latest"``: the newest checkpoint if any; else that checkpoint folder."""
    if rank == 0:
        runs.remove_partial_writes(root)  # what a killed run was writing
    path = runs.resolve_resume(resume, root, overwrite=overwrite, marker="progress.json", remove=rank == 0)
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


@dataclass
class Request:
    """One ``run_stage`` call, checked: what to train and from where."""

    recipe: TrainRecipe
    stage: int
    init_from: str | None
    steps: int  # where this run stops
    resume_from: Path | None = None
    base: str | None = None  # a LoRA stage: the checkpoint its adapters adapt
    streamed: bool = False  # data= names shards, read as a stream

    @property
    def cfg(self):
        return self.recipe.stage(self.stage)


def check_request(recipe: TrainRecipe, stage: int, resume: str | None, max_steps: int | None) -> Path | None:
    """Checks before any work; returns the final weights when ``--resume latest`` finds the stage finished."""
    final_dir = stage_dir(recipe, stage) / "final"
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
    return None


def load_model(req: Request, accelerator, samples):
    """The stage's model and processor: a LoRA base, the checkpoint to resume, or the stage's start."""
    rank = accelerator.process_index
    if rank > 0:  # rank 0 may train the tokenizer of a fresh model; the others then build the same model
        parallel.barrier()
    if req.base is not None:
        model, processor = load_pretrained(req.base)
    elif req.resume_from is not None:
        model, processor = load_pretrained(req.resume_from / "model")
    else:
        model, processor = load_start(req.recipe, req.stage, samples, req.init_from)
    if rank == 0:
        parallel.barrier()
    cfg = req.cfg
    if cfg.lora is not None and cfg.lora.quantize is not None:  # bitsandbytes layers quantize on the move to CUDA
        lora_.quantize_targets(model, cfg.lora, f"stage{req.stage}.lora",
                               torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32)
    model.to(accelerator.device).train()
    model.language_model.model.gradient_checkpointing = req.recipe.grad_checkpointing
    return model, processor


def choose_trainable(req: Request, model, kind: str):
    """(trained parameter groups, the LoRA ``Adapter`` or None): adapters attached, or the stage's groups
    unfrozen."""
    cfg = req.cfg
    if cfg.lora is None:
        groups = stage_groups(model.config, cfg.groups, cfg.train_llm)
        set_trainable(model, groups)
        return groups, None
    torch.manual_seed(req.recipe.seed)  # the adapters' initial A
    peft_model = lora_.attach(model, cfg.lora, f"stage{req.stage}.lora")  # freezes everything else
    if req.resume_from is not None:
        lora_.load_adapter_weights(peft_model, req.resume_from / "adapter")
    groups = {g for g, (trainable, _) in lora_.trainable_summary(model).items() if trainable}
    return groups, ckpt.Adapter(peft_model, req.base, kind != "fsdp" and cfg.lora.quantize is None)


def plan_request(recipe, stage, init_from, resume, steps, accelerator, kind) -> Request:
    """Where the stage starts (resume, LoRA base, start weights), named before anything is written."""
    req = Request(recipe, stage, init_from, steps)
    req.resume_from = resolve_resume(resume, stage_dir(recipe, stage) / "checkpoints", recipe.overwrite,
                                     accelerator.process_index)
    cfg = req.cfg
    if cfg.lora is not None:
        check_lora_run(cfg.lora, accelerator.device, kind, accelerator.num_processes, stage)
        base = None
        if req.resume_from is not None:  # a damaged adapter is named before any model loads
            lora_.read_adapter_weights(req.resume_from / "adapter")
            base = lora_.read_base(req.resume_from / "adapter")
        req.base = base or lora_base(recipe, stage, init_from)
    elif req.resume_from is None:
        start_source(recipe, stage, init_from)  # a missing start is named before anything is written
    parallel.barrier()
    return req


def usable_pools(samples, bad: BadSamples, builder: BatchBuilder, objective: str = "sft") -> dict:
    """The task pools without the samples the model cannot use: codes its VQ could not have made, rows too long
    for max_seq_len. They join ``bad`` (the run's bad-samples file); too many of them stop the run."""
    if objective != "sft":
        return preference_pools(samples, bad, builder, objective)
    read = len(samples) + len(bad)  # the samples the manifest holds: those already set aside had bad files
    vq = builder.model.config.vq
    pools = builder.skip_unfit(task_pools(check_codes(samples, vq.num_tokens, vq.codebook_size, bad, read)), bad)
    bad.check_share(read)
    return pools


def open_stream(req: Request, builder: BatchBuilder, rank: int, world: int, bad: BadSamples) -> StreamedPicks:
    """This process's share of the streamed shards; what it skips is listed in ``bad`` at each checkpoint."""
    recipe, cfg = req.recipe, req.cfg
    stream = ShardStream(recipe.data, cfg.batch_size * world, seed=recipe.seed, rank=rank, world=world,
                         bad=BadSamples(recipe.max_bad_fraction), check=sample_check(builder, cfg.mixture))
    return StreamedPicks(stream, cfg.mixture, seed=recipe.seed, stage=req.stage, grad_accum=cfg.grad_accum,
                         caption_dropout=recipe.caption_dropout, bad=bad)


def build_task(req: Request, accelerator, kind: str, samples, bad: BadSamples) -> StageTask:
    """Model, trainable groups, wrapped module, optimizer and schedule (resumed if asked), the run folder."""
    recipe, stage, cfg = req.recipe, req.stage, req.cfg
    rank, world = accelerator.process_index, accelerator.num_processes
    model, processor = load_model(req, accelerator, samples)
    builder = (StreamBatchBuilder if req.streamed else BatchBuilder)(model, processor, recipe.question,
                                                                     recipe.max_seq_len)
    pools = {} if req.streamed else usable_pools(samples, bad, builder, cfg.objective)
    groups, adapter = choose_trainable(req, model, kind)
    data = open_stream(req, builder, rank, world, bad) if req.streamed else None
    # streamed: any task may come, so each task the mixture weighs must reach a trained group
    check_tasks(dict.fromkeys(TASKS, [None]) if req.streamed else pools, cfg, groups, stage)
    if rank == 0:
        parallel.log_trainable(model, groups, stage)
        log.info("stage %d: %s, %d process(es), global batch %d x %d micro-batch(es)", stage, kind, world,
                 cfg.batch_size * world, cfg.grad_accum)
    raw = {}

    def optimizer_factory():
        raw["optimizer"] = make_optimizer(model, groups, cfg)
        return raw["optimizer"]

    step = TrainStep(model) if cfg.objective == "sft" else preference_step(req, model, adapter, accelerator.device)
    wrapped, optimizer = parallel.wrap(accelerator, kind, step, optimizer_factory, cfg, recipe.grad_clip)
    state = ckpt.TrainingState(wrapped, model, processor, optimizer, make_scheduler(raw["optimizer"], cfg),
                               accelerator, kind, rank, adapter, data)
    start = 0
    if req.resume_from is not None:
        start = ckpt.load_checkpoint(req.resume_from, state)
        if rank == 0:
            log.info("resumed stage %d at step %d from %s", stage, start, req.resume_from)
    if rank == 0:  # only now that the start (and a checkpoint to resume) has loaded
        set_aside_later_stages(recipe, stage)
        stage_dir(recipe, stage).mkdir(parents=True, exist_ok=True)
        write_inputs(recipe, stage, bad)
    parallel.barrier()
    metrics = TrainMetrics(Path(recipe.output_dir), stage, recipe.tensorboard) if rank == 0 else None
    if metrics is not None:
        metrics.rewind(start)
    task = StageTask if cfg.objective == "sft" else PreferenceTask
    return task(recipe, stage, state, builder, pools, metrics, stage_dir(recipe, stage) / "checkpoints",
                req.steps, start, req.resume_from, raw["optimizer"], [state.scheduler], data,
                stand_ins(builder, recipe.question) if req.streamed else None)


def finish(task: StageTask) -> Path:
    """A run cut short by ``max_steps`` leaves a checkpoint to continue from; every run ends in ``final``."""
    cfg = task.cfg
    done = max(task.step, task.steps)
    if done < cfg.steps and not (task.ckpt_root / runs.step_dir_name(done)).is_dir():
        task.save_checkpoint(done)  # the stage is not finished, and --resume latest continues it from here
    task.write_bad_samples()
    final = ckpt.save_final(stage_dir(task.recipe, task.stage), task.state, stage=task.stage, step=done,
                            steps=cfg.steps)
    if task.metrics is not None:
        task.metrics.close()
        log.info("stage %d done: %s", task.stage, final)
    return final


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
    finished = check_request(recipe, stage, resume, max_steps)
    if finished is not None:
        return finished
    accelerator = parallel.make_accelerator(recipe, cfg.grad_accum)
    kind = parallel.strategy(accelerator, recipe)
    bad = BadSamples(recipe.max_bad_fraction)
    streamed = is_streamed(recipe.data)
    if streamed:  # a fresh model's tokenizer reads the texts (one pass); images are decoded as training reaches them
        list_shards(recipe.data)  # no shards: named before any work
        samples = text_samples(recipe.data)
    else:
        samples, _ = check_sample_files(read_samples(recipe.data), bad)
    steps = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    req = plan_request(recipe, stage, init_from, resume, steps, accelerator, kind)
    req.streamed = streamed
    task = build_task(req, accelerator, kind, samples, bad)
    run_loop(task, steps, desc=f"stage {stage}", progress=progress and accelerator.process_index == 0)
    return finish(task)


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
