"""One training stage: staged unfreezing, token-normalised losses over accumulated micro-batches,
atomic resumable checkpoints, metrics.jsonl. The batch of step ``s`` is drawn from a generator
seeded by (seed, stage, s), so a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unigen.model import UniGenModel
from unigen.param_groups import parameter_groups, set_trainable, stage_groups
from unigen.processor import UniGenProcessor
from unigen.tokenizer_training import common
from unigen.tokenizer_training.config_io import config_to_dict
from unigen.train.batches import IGNORE, BatchBuilder
from unigen.train.data import Sample, check_images, read_samples
from unigen.train.recipe import TrainRecipe

log = logging.getLogger("unigen.train")
TASKS = ("understanding", "text", "generation")


def stage_dir(recipe: TrainRecipe, stage: int) -> Path:
    return Path(recipe.output_dir) / f"stage{stage}"


def build_fresh(recipe: TrainRecipe, samples: list[Sample]) -> tuple[UniGenModel, UniGenProcessor]:
    """A new model of the recipe's size with a word-level tokenizer trained on the data's text."""
    from unigen.config import UniGenConfig
    from unigen.processor import JANUS_SYSTEM_PROMPT
    from unigen.text_tokenizer import special_token_ids, train_text_tokenizer

    config = UniGenConfig.from_dict(recipe.model)
    config.system_prompt = recipe.system_prompt
    texts = [t for s in samples for t in (s.caption, s.question, s.answer, s.text) if t]
    texts += [recipe.question, recipe.system_prompt or JANUS_SYSTEM_PROMPT]
    tok_dir = Path(recipe.output_dir) / "tokenizer"
    tokenizer = train_text_tokenizer(texts, tok_dir, vocab_size=recipe.tokenizer_vocab, kind="wordlevel")
    config.tokens = special_token_ids(tokenizer)
    if len(tokenizer) > config.llm.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.llm.vocab_size is "
                         f"{config.llm.vocab_size}; raise model.llm.vocab_size")
    torch.manual_seed(recipe.seed)
    model = UniGenModel(config)
    if recipe.vq_from:
        from unigen.tokenizer_training.vq_trainer import load_vq_into

        load_vq_into(model, recipe.vq_from)
    if recipe.siglip_from:
        from unigen.tokenizer_training.siglip_trainer import load_siglip_into

        load_siglip_into(model, recipe.siglip_from)
    return model, UniGenProcessor(tokenizer, config)


def load_start(recipe: TrainRecipe, stage: int, samples, init_from: str | None):
    source = init_from or recipe.init_from
    if source is None and stage > 1:
        previous = stage_dir(recipe, stage - 1) / "final"
        if not (previous / "config.json").is_file():
            raise FileNotFoundError(f"stage {stage} starts from stage {stage - 1}'s final weights, but {previous} "
                                    "does not exist: train that stage first or pass --init-from DIR")
        source = str(previous)
    if source is None:
        if not recipe.model:
            raise ValueError("no model to train: set init_from (a checkpoint) or a model: section in the recipe")
        return build_fresh(recipe, samples)
    model = UniGenModel.from_pretrained(source)
    return model, UniGenProcessor.from_pretrained(source, config=model.config)


def make_optimizer(model, groups: set[str], cfg) -> torch.optim.AdamW:
    param_groups = []
    for name, params in parameter_groups(model).items():
        trainable = [p for _, p in params if p.requires_grad]
        if name in groups and trainable:
            mult = float(cfg.lr_mult.get(name, 1.0))
            param_groups.append({"params": trainable, "lr": cfg.lr * mult, "lr_mult": mult, "name": name})
    if not param_groups:
        raise ValueError(f"stage trains nothing: groups {sorted(groups)} have no parameters in this model")
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)


def draw_step(pools: dict[str, list[Sample]], mixture, batch: int, g: torch.Generator, caption_dropout: float,
              rank: int = 0, world: int = 1) -> dict:
    """The step's global batch (identical on every rank), then this rank's share of it.

    ``"dropped"`` marks the generation samples trained with the unconditional (CFG) prompt.
    """
    weights = torch.tensor([w if pools[t] else 0.0 for t, w in zip(TASKS, mixture, strict=True)])
    if weights.sum() <= 0:
        raise ValueError(f"task mixture {tuple(mixture)} selects no task that the data has "
                         f"({ {t: len(p) for t, p in pools.items()} })")
    tasks = torch.multinomial(weights, batch, replacement=True, generator=g).tolist()
    picked: dict[str, list[Sample]] = {t: [] for t in TASKS}
    for k in tasks:
        pool = pools[TASKS[k]]
        picked[TASKS[k]].append(pool[int(torch.randint(len(pool), (1,), generator=g))])
    picked["dropped"] = torch.rand(len(picked["generation"]), generator=g) < caption_dropout
    return {task: chosen[rank::world] for task, chosen in picked.items()}


def task_loss(model, builder: BatchBuilder, task: str, samples, dropped, device) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy and the supervised token count of one task's micro-batch."""
    if task == "generation":
        b = builder.generation(samples, dropped)
        logits = model.image_logits(b["input_ids"].to(device), b["codes"].to(device), b["attention_mask"].to(device))
        return F.cross_entropy(logits.flatten(0, 1).float(), b["codes"].to(device).flatten(), reduction="sum"), \
            b["codes"].numel()
    b = builder.understanding(samples) if task == "understanding" else builder.text(samples)
    pixels = b.get("pixel_values")
    out = model(b["input_ids"].to(device), pixel_values=None if pixels is None else pixels.to(device),
                attention_mask=b["attention_mask"].to(device))
    targets = b["targets"].to(device)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def run_stage(recipe: TrainRecipe, stage: int, *, init_from: str | None = None, resume: str | None = None,
              max_steps: int | None = None, progress: bool = True) -> Path:
    """Train one stage; returns ``OUTPUT_DIR/stageN/final`` (a checkpoint the pipeline loads)."""
    common.setup_logging()
    cfg = recipe.stage(stage)
    out = stage_dir(recipe, stage)
    out.mkdir(parents=True, exist_ok=True)
    (Path(recipe.output_dir) / "recipe.json").write_text(json.dumps(config_to_dict(recipe), indent=2) + "\n")
    samples, bad = check_images(read_samples(recipe.data))
    if bad:
        with (Path(recipe.output_dir) / "bad_samples.jsonl").open("w") as f:
            f.writelines(json.dumps(b) + "\n" for b in bad)
        log.warning("skipped %d sample(s) with missing or unreadable images (listed in bad_samples.jsonl)", len(bad))
    pools = {t: [s for s in samples if t in s.tasks] for t in TASKS}

    device = common.resolve_device(recipe.device)
    rank, world = dist_setup()
    if rank > 0:  # rank 0 trains the tokenizer of a fresh model first; the others then build the same model
        torch.distributed.barrier()
    model, processor = load_start(recipe, stage, samples, init_from)
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    model.to(device).train()
    if recipe.grad_checkpointing:
        lm = model.language_model  # transformers 5 renamed the switch
        (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)()
    groups = stage_groups(model.config, cfg.groups, cfg.train_llm)
    set_trainable(model, groups)
    for name, params in parameter_groups(model).items():
        n = sum(p.numel() for _, p in params)
        if n:
            log.info("stage %d  %-16s %12d params  %s", stage, name, n, "TRAIN" if name in groups else "frozen")
    optimizer = make_optimizer(model, groups, cfg)
    builder = BatchBuilder(model, processor, recipe.question, recipe.caption_dropout)
    ckpt_root = out / "checkpoints"
    start = 0
    resume_from = common.resolve_resume(resume, ckpt_root)
    if resume_from is not None:
        state = torch.load(resume_from / "training_state.pt", weights_only=True)
        model.load_state_dict(UniGenModel.from_pretrained(resume_from / "model").state_dict())
        optimizer.load_state_dict(state["optimizer"])
        common.set_rng_state(state["rng"])
        start = state["step"]
        log.info("resumed stage %d at step %d from %s", stage, start, resume_from)
    metrics = common.MetricsLog(Path(recipe.output_dir), tensorboard=recipe.tensorboard)
    steps = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16)
    bar = tqdm(range(start, steps), desc=f"stage {stage}", disable=not progress, initial=start, total=steps)
    last_good = resume_from
    for step in bar:
        t0 = time.perf_counter()
        lr = common.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, "cosine", cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + stage * 10_007 + step)
        micro = [draw_step(pools, cfg.mixture, cfg.batch_size * world, g, recipe.caption_dropout, rank, world)
                 for _ in range(cfg.grad_accum)]
        sums = {t: 0.0 for t in TASKS}
        counts = {t: 0 for t in TASKS}
        total = 0
        losses = []
        for picked in micro:  # the loss is normalised by the step's token count over all micro-batches and ranks
            for task in TASKS:
                chosen = picked[task]
                if chosen:
                    with autocast:
                        loss, n = task_loss(model, builder, task, chosen, picked["dropped"], device)
                    losses.append((task, loss, n))
                    total += n
        total = all_reduce_sum(torch.tensor([float(total)]))[0].item()
        for task, loss, n in losses:
            (loss / total).backward()
            sums[task] += loss.item()
            counts[task] += n
        if world > 1:  # each rank's loss already carries the global normaliser, so gradients simply add up
            for p in model.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
        reduced = all_reduce_sum(torch.tensor([sums[t] for t in TASKS] + [float(counts[t]) for t in TASKS]))
        sums = dict(zip(TASKS, reduced[:3].tolist(), strict=True))
        counts = dict(zip(TASKS, reduced[3:].tolist(), strict=True))
        step_loss = sum(sums.values()) / total
        if not torch.isfinite(torch.tensor(step_loss)):
            raise FloatingPointError(
                f"stage {stage} step {step}: the loss is {step_loss}; stopping. The last good checkpoint is "
                f"{last_good or 'none (no checkpoint written yet)'}; lower the learning rate or check the data")
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"stage": stage, "loss": step_loss, "lr": lr, "tokens": total,
               "tokens_per_s": total / (time.perf_counter() - t0)}
        row.update({f"loss_{t}": sums[t] / counts[t] for t in TASKS if counts[t]})
        if rank == 0:
            metrics.write(step + 1, "train", row)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if rank == 0 and recipe.save_every and (step + 1) % recipe.save_every == 0 and step + 1 < steps:
            last_good = save_training_state(ckpt_root, step + 1, model, processor, optimizer, recipe.keep_last)
    final = out / "final"
    if rank == 0:
        model.save_pretrained(final)
        processor.save_pretrained(final)
    if world > 1:
        torch.distributed.barrier()
    log.info("stage %d done: %s", stage, final)
    return final


def dist_setup() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun (gloo on CPU, nccl on GPU)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), world


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
    return x


def save_training_state(root: Path, step: int, model, processor, optimizer, keep_last: int) -> Path:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": common.rng_state()},
                   tmp / "training_state.pt")

    return common.save_checkpoint_dir(root, step, write, keep_last)
