"""Which samples each optimizer step trains on.

The batch of step ``s`` comes from a generator seeded by (seed, stage, s) alone, so a resumed run sees
exactly the batches an uninterrupted one would, and every process draws the same global batch and
takes its own contiguous share of it: N processes train on what one process would at N x the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unigen.data.manifest import Sample
from unigen.generation.editing import CFG_DROPS
from unigen.training.recipe import TASKS


@dataclass
class Pick:
    task: str
    sample: Sample
    dropped: bool = False  # generation: trained on the unconditional (CFG) prompt
    drop: str | None = None  # a dropped edit: what its unconditional prompt drops (unigen.generation.editing.CFG_DROPS)


def task_pools(samples: list[Sample]) -> dict[str, list[Sample]]:
    return {t: [s for s in samples if t in s.tasks] for t in TASKS}


def check_mixture(pools: dict[str, list[Sample]], mixture, stage: int) -> None:
    missing = [t for t, w in zip(TASKS, mixture, strict=True) if w > 0 and not pools[t]]
    if missing and len(missing) == sum(w > 0 for w in mixture):
        raise ValueError(f"stage {stage} mixture {list(mixture)} ({' : '.join(TASKS)}) selects no task the data "
                         f"has ({ {t: len(p) for t, p in pools.items()} })")


def draw(pools: dict[str, list[Sample]], mixture, size: int, g: torch.Generator, caption_dropout: float) -> list[Pick]:
    weights = torch.tensor([w if pools[t] else 0.0 for t, w in zip(TASKS, mixture, strict=True)])
    picks = []
    for k in torch.multinomial(weights, size, replacement=True, generator=g).tolist():
        pool = pools[TASKS[k]]
        sample = pool[int(torch.randint(len(pool), (1,), generator=g))]
        dropped = TASKS[k] == "generation" and bool(torch.rand((), generator=g) < caption_dropout)
        drop = None
        if dropped and sample.instruction is not None:  # drawn only for edits: other runs see the same batches
            drop = CFG_DROPS[int(torch.randint(len(CFG_DROPS), (1,), generator=g))]
        picks.append(Pick(TASKS[k], sample, dropped, drop))
    return picks


def step_micro_batches(pools, mixture, *, seed: int, stage: int, step: int, size: int, grad_accum: int,
                       caption_dropout: float) -> list[list[Pick]]:
    """The global micro-batches of step ``step`` (``size`` picks each), the same on every process. The step's
    picks are drawn at once: the same global batch whatever its split into micro-batches and processes."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + step)
    picks = draw(pools, mixture, size * grad_accum, g, caption_dropout)
    return [picks[i * size : (i + 1) * size] for i in range(grad_accum)]


def share(picks: list[Pick], rank: int, world: int) -> list[Pick]:
    """This process's contiguous share of a global micro-batch."""
    n = len(picks) // world
    return picks[rank * n : (rank + 1) * n]
