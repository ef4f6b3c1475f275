"""A preference stage (``objective: dpo`` or ``cca``) as a task of the one loop: the stage's set-up, batches of the
same seeded draw, update and checkpoints as any stage (``unigen.training.stage.StageTask``), with pairs of rows
instead of rows and the losses of ``unigen.training.preference`` against a frozen reference.

The reference is the stage's start (a second, frozen copy of it), or in a LoRA stage the same model with its
adapters disabled (PEFT's ``disable_adapter``, as TRL does: no second copy). dpo reads preference lines
(``unigen.data.manifest``: image pairs train in the mixture's generation share, answer pairs in its
understanding share); cca reads caption lines, each image scored under its own prompt and under the next row's
prompt of the global micro-batch (the official code's ``torch.roll``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

import unigen.training.parallel as parallel
from unigen.data.bad_samples import BadSamples
from unigen.data.checks import check_codes
from unigen.data.manifest import ANSWER_PAIR, IMAGE_PAIR, Sample
from unigen.errors import ConfigError, DataError
from unigen.training.batches import IGNORE, BatchBuilder, TooLongError
from unigen.training.metrics import preference_row
from unigen.training.mixture import Pick, share, step_micro_batches
from unigen.training.preference import PairScores, PreferenceSettings, cca_losses, dpo_losses, sequence_logps
from unigen.training.stage import StageTask

KINDS = ("generation", "understanding")  # image rows, answer rows
STATS = ("loss", "chosen_reward", "rejected_reward", "correct", "sft")  # what a forward returns, summed over pairs


@dataclass
class Row:
    """One pair of a step: a pick, and for cca the sample whose prompt is its mismatch (None: none differs)."""

    pick: Pick
    other: Sample | None = None


# ---- data -------------------------------------------------------------------------------------------------

def preference_pools(samples: list[Sample], bad: BadSamples, builder: BatchBuilder, objective: str) -> dict:
    """The stage's pools in ``TASKS`` order: dpo's answer pairs (understanding) and image pairs (generation), or
    cca's caption lines (generation). Codes the VQ could not have made and rows too long are set aside in ``bad``."""
    read = len(samples) + len(bad)
    vq = builder.model.config.vq
    samples = check_codes(samples, vq.num_tokens, vq.codebook_size, bad, read)
    if objective == "dpo":
        pools = {"understanding": [s for s in samples if ANSWER_PAIR in s.tasks], "text": [],
                 "generation": [s for s in samples if IMAGE_PAIR in s.tasks]}
        missing = ('preference lines ({"prompt", "chosen", "rejected"} or {"image", "question", "chosen", '
                   '"rejected"}; `unigen pairs` writes them)')
    else:
        pools = {"understanding": [], "text": [],
                 "generation": [s for s in samples if "generation" in s.tasks and s.instruction is None]}
        missing = 'caption lines ({"image", "caption"}) to contrast prompts over'
    batches = PairBatches(builder)
    for task, pool in pools.items():
        kept = []
        for s in pool:
            try:
                batches.rows_of(task, s)
                kept.append(s)
            except TooLongError as err:
                bad.add(s.source or f"line {s.line}", f"the {objective} rows: {err}", line=s.line)
        pools[task] = kept
    bad.check_share(read)
    if not any(pools.values()):
        raise DataError(f"objective {objective}: the data holds no {missing}")
    return pools


class PairBatches:
    """Pairs -> the rows of both sides, chosen (cca: own prompt) rows first, with ``BatchBuilder``'s prompts."""

    def __init__(self, builder: BatchBuilder):
        self.b = builder

    def rows_of(self, task: str, s: Sample) -> None:
        """Build a sample's rows once (a row too long raises ``TooLongError``)."""
        if task == "understanding":
            for answer in (s.chosen, s.rejected):
                self.b.understanding_row(dataclasses.replace(s, turns=[(s.question, answer)]))
        else:
            self.b.generation_prompt(Pick("generation", s))

    def side_codes(self, s: Sample, side: str) -> torch.Tensor:
        """The codes the sampler drew for one side of an image pair, else its image's encoding."""
        codes = getattr(s, f"{side}_codes")
        if codes is not None:
            return torch.as_tensor(codes).long().flatten()
        return self.b._codes_of_images([getattr(s, side)])[0]

    def image_pairs(self, rows: list[Row]) -> dict:
        prompts = [self.b.generation_prompt(r.pick).tolist() for r in rows]
        batch = self.b.processor.pad(prompts * 2)
        batch["codes"] = torch.stack([self.side_codes(r.pick.sample, side) for side in ("chosen", "rejected")
                                      for r in rows])
        return batch

    def cca_rows(self, rows: list[Row]) -> dict:
        """Own prompts, then each row's mismatched prompt (its own, unconditional, where there is none)."""
        own = [self.b.generation_prompt(r.pick).tolist() for r in rows]
        other = [self.b.generation_prompt(Pick("generation", r.other or r.pick.sample, r.pick.dropped)).tolist()
                 for r in rows]
        batch = self.b.processor.pad(own + other)
        codes = self.b.codes_for([r.pick.sample for r in rows])
        batch["codes"] = torch.cat([codes, codes])
        batch["positive"] = torch.tensor([r.other is None or r.pick.dropped for r in rows])
        return batch

    def answer_pairs(self, rows: list[Row]) -> dict:
        samples = [r.pick.sample for r in rows]
        batch = self.b._right_pad([self.b.understanding_row(dataclasses.replace(s, turns=[(s.question, answer)]))
                                   for side in ("chosen", "rejected") for s in samples
                                   for answer in [getattr(s, side)]])
        batch["pixel_values"] = self.b._understanding_pixels([s.image for s in samples] * 2)
        return batch

    def build(self, rows: list[Row], objective: str, fill: dict[str, Row] | None = None) -> dict[str, dict]:
        """One batch per kind present; ``fill``: kinds absent here but present on another process, built from
        that row with weight 0 (FSDP runs the same modules on every process)."""
        by_kind: dict[str, list[Row]] = {}
        for r in rows:
            by_kind.setdefault(r.pick.task, []).append(r)
        out = {}
        for kind, chosen in list(by_kind.items()) + [(k, [r]) for k, r in (fill or {}).items() if k not in by_kind]:
            if kind == "understanding":
                b = self.answer_pairs(chosen)
            else:
                b = (self.cca_rows if objective == "cca" else self.image_pairs)(chosen)
            real = kind in by_kind
            b["weight"], b["pairs"] = (1.0, len(chosen)) if real else (0.0, 0)
            out[kind] = b
        return out


def mismatches(picks: list[Pick]) -> list[Row]:
    """cca: each pick with the next pick of the micro-batch (cyclically) whose prompt differs, or None."""
    rows = []
    for i, p in enumerate(picks):
        later = (picks[(i + k) % len(picks)].sample for k in range(1, len(picks)))
        rows.append(Row(p, next((s for s in later if s.caption != p.sample.caption), None)))
    return rows


# ---- the forward ------------------------------------------------------------------------------------------

class PreferenceStep(nn.Module):
    """The training forward of a preference stage: (len(STATS),) sums over this micro-batch's pairs; only the
    loss carries a gradient. Wrapped by DDP / FSDP as ``TrainStep`` is; the reference is held outside the module
    tree, so no wrapper syncs, shards or trains it."""

    def __init__(self, model, objective: str, settings: PreferenceSettings, reference=None, peft_model=None):
        super().__init__()
        self.model = model
        self.objective, self.settings = objective, settings
        self._frozen = (reference, peft_model)

    @contextlib.contextmanager
    def reference(self):
        reference, peft_model = self._frozen
        if reference is not None:
            yield reference
        else:
            with peft_model.disable_adapter():
                yield self.model

    def forward(self, batch: dict[str, dict]) -> torch.Tensor:
        device = self.model.device
        out = torch.zeros(len(STATS), device=device)
        for kind in KINDS:
            if (b := batch.get(kind)) is None:
                continue
            b = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            logps, tokens = scores(self.model, kind, b)
            with torch.no_grad(), self.reference() as reference:
                ref, _ = scores(reference, kind, b)
            n = logps.shape[0] // 2
            pair = PairScores(logps[:n], logps[n:], ref[:n], ref[n:], tokens[:n], tokens[n:])
            if self.objective == "cca":
                result = cca_losses(pair, b["positive"], self.settings)
            else:
                result = dpo_losses(pair, self.settings)
            stats = [result.losses, result.chosen_rewards, result.rejected_rewards, result.correct, result.sft]
            out = out + torch.stack([x.sum() for x in stats]) * b["weight"]
        return out


def scores(model, kind: str, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows,) summed log-probabilities of the scored tokens (image codes, or supervised answer tokens) and
    their counts."""
    if kind == "generation":
        logits = model.image_logits(b["input_ids"], b["codes"], b["attention_mask"])
        return sequence_logps(logits, b["codes"]), torch.full_like(b["codes"][:, 0], b["codes"].shape[1]).float()
    if model.cross_attn_layers is not None:  # Method B: the images enter through the cross-attention blocks
        hidden = model(b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"])
    else:
        embeds = model.prepare_inputs_embeds(b["input_ids"], b["pixel_values"])
        hidden = model.run_decoder(embeds, b["attention_mask"])
    targets = b["targets"]
    keep = targets != IGNORE
    logps = torch.log_softmax(model.language_model.lm_head(hidden.last_hidden_state[keep]).float(), -1)
    picked = logps.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(len(targets), device=picked.device).index_add(0, rows, picked), keep.sum(1).float()


def preference_step(req, model, adapter, device) -> PreferenceStep:
    """The stage's forward with its reference: the start loaded again and frozen, or (LoRA) the adapters off."""
    from unigen.training.start import load_pretrained, start_source

    cfg, where = req.cfg, f"stage{req.stage}"
    if req.streamed:
        raise ConfigError(f"{where}.objective={cfg.objective} reads a JSONL manifest; streamed shards train sft "
                          "stages only")
    if adapter is not None:
        return PreferenceStep(model, cfg.objective, cfg.preference, peft_model=adapter.peft_model)
    source = start_source(req.recipe, req.stage, req.init_from)
    if source is None:
        raise ConfigError(f"{where}.objective={cfg.objective} tunes a trained model against its start, but stage "
                          f"{req.stage} would start from a new one; set init_from (or --init-from) to a checkpoint")
    reference, _ = load_pretrained(source)
    reference.to(device).eval().requires_grad_(False)
    return PreferenceStep(model, cfg.objective, cfg.preference, reference=reference)


# ---- the task ---------------------------------------------------------------------------------------------

@dataclass
class PreferenceTask(StageTask):
    """A stage whose step trains on pairs; set-up, update, logging and checkpoints are ``StageTask``'s."""

    def micro_batches(self) -> list[dict]:
        cfg, rank, world = self.cfg, self.state.rank, self.world
        settings = cfg.preference
        micro = step_micro_batches(self.pools, cfg.mixture, seed=self.recipe.seed, stage=self.stage, step=self.step,
                                   size=cfg.batch_size * world, grad_accum=cfg.grad_accum,
                                   caption_dropout=self.recipe.caption_dropout if settings.unconditional else 0.0)
        pairs, batches = PairBatches(self.builder), []
        for picks in micro:
            rows = mismatches(picks) if cfg.objective == "cca" else [Row(p) for p in picks]
            fill = None
            if self.state.kind == "fsdp":
                fill = {}
                for r in rows:
                    fill.setdefault(r.pick.task, r)
            batches.append(pairs.build(share(rows, rank, world), cfg.objective, fill))
        return batches

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        lrs = self.lr_row()
        batches = self.micro_batches()
        local = sum(b["pairs"] for mb in batches for b in mb.values())
        pairs = float(parallel.all_reduce_sum(torch.tensor([float(local)], dtype=torch.float64),
                                              self.state.accelerator.device)[0])
        # the loss is the mean over the step's pairs; undo the wrappers' averaging as StageTask does
        scale = torch.zeros(len(STATS), device=self.state.accelerator.device)
        scale[0] = self.world * self.cfg.grad_accum / pairs
        sums = self.accumulate(batches, scale)
        grad_norm = self.apply_update()
        row = {**preference_row(dict(zip(STATS, sums.tolist(), strict=True)), pairs), **lrs}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        row["pairs_per_s"] = pairs / (time.perf_counter() - t0)
        return row
