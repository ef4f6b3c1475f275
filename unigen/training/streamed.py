"""A stage trained from streamed shards (``unigen.data.stream``) instead of in-memory task pools.

The stream's order decides the samples: step ``s`` trains on the next ``grad_accum`` global batches of
``batch_size x processes`` records, each process on its contiguous share. Which of its tasks a sample trains
(a caption line: understanding or generation) and whether its caption is dropped are drawn per position in
the global batch from (seed, stage, step) alone, so N processes train on what one process would, and a run
resumed from the stream's position (saved in the checkpoint) continues with the very next batch. A sample whose
tasks all have weight 0 in the stage's mixture is passed over (it is no bad sample). An edit record (source image,
instruction, target image) trains in the generation share, as a manifest's edit line does; a dropped one takes
the unconditional row drawn for its position.

A process whose share of a micro-batch lacks a task that another process's share has runs a stand-in row of
that task with weight 0 (FSDP needs every process to run the same modules; DDP needs every process to run a
backward): its gradient is exactly zero, so the update is the one of the real samples.
"""

from __future__ import annotations

import torch
from PIL import Image

from unigen.data.bad_samples import BadSamples
from unigen.data.codes import BadCodes, codes_fit, read_codes
from unigen.data.manifest import Sample
from unigen.data.stream import ShardStream
from unigen.generation.editing import CFG_DROPS
from unigen.training.batches import BatchBuilder, TooLongError
from unigen.training.mixture import Pick
from unigen.training.recipe import TASKS


def gather_objects(value) -> list:
    """Every process's ``value``, by rank (collective; one process: ``[value]``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, value)
        return parts
    return [value]


def choose_task(sample: Sample, mixture, u: float) -> str | None:
    """One of the sample's tasks, drawn with the mixture's weights (``u`` uniform in [0, 1)); None when the
    stage gives all of them weight 0."""
    weights = [(t, w) for t, w in zip(TASKS, mixture, strict=True) if w > 0 and t in sample.tasks]
    x, acc = u * sum(w for _, w in weights), 0.0
    for task, w in weights:
        acc += w
        if x < acc:
            return task
    return weights[-1][0] if weights else None


class StreamBatchBuilder(BatchBuilder):
    """Streamed images are decoded PIL images seen once an epoch: their VQ codes are encoded one image at a
    time (the same codes whatever the split over processes) and not kept."""

    @torch.no_grad()
    def codes_for(self, samples: list[Sample]) -> torch.Tensor:
        return torch.stack([s.codes if s.codes is not None else self._encode(s.vq_image) for s in samples]).long()

    @torch.no_grad()
    def _codes_of_images(self, images: list) -> torch.Tensor:
        """Edit sources' codes (Method B's source slots), one image at a time: no cache keyed by file name."""
        return torch.stack([self._encode(image) for image in images]).long() if images else \
            torch.zeros(0, dtype=torch.long)

    def _encode(self, image) -> torch.Tensor:
        pixels = self.processor.generation_pixels([image]).to(self.model.device, self.model.dtype)
        return self.model.encode_image_tokens(pixels)[0].cpu()


def sample_check(builder: BatchBuilder, mixture):
    """Why a streamed sample cannot train (codes its VQ could not have made, a row too long for max_seq_len), or
    None: the checks the in-memory pools get at start-up, made as the stream decodes it."""
    vq = builder.model.config.vq
    rows = {"understanding": builder.understanding_row, "text": builder.text_row,
            "generation": lambda s: builder.generation_prompt(Pick("generation", s))}
    weighted = [t for t, w in zip(TASKS, mixture, strict=True) if w > 0]  # in TASKS order: one reason each run

    def check(s: Sample) -> str | None:
        try:
            if s.codes is not None:
                s.codes = read_codes(s.codes, s.source)
                codes_fit(s.codes, vq.num_tokens, vq.codebook_size, s.source)
        except BadCodes as err:
            return str(err)
        for task in (t for t in weighted if t in s.tasks):
            try:
                rows[task](s)
            except TooLongError as err:
                return f"the {task} row: {err}"
        return None

    return check


def stand_ins(builder: BatchBuilder, question: str) -> dict[str, Pick]:
    """A row of each task for a share that lacks it, trained with weight 0 (its content never reaches a
    weight)."""
    config = builder.model.config
    size = config.vision.image_size
    codes = torch.zeros(config.vq.num_tokens, dtype=torch.int32)
    return {"understanding": Pick("understanding", Sample(0, image=Image.new("RGB", (size, size)), caption=question)),
            "text": Pick("text", Sample(0, text=question)),
            "generation": Pick("generation", Sample(0, caption=question, codes=codes))}


class StreamedPicks:
    """This process's picks of each step, from a :class:`ShardStream`; ``bad``: the run's list of skipped samples,
    where the rows every process's stream lists are gathered (:meth:`gather_bad`) for rank 0 to write."""

    def __init__(self, stream: ShardStream, mixture, *, seed: int, stage: int, grad_accum: int,
                 caption_dropout: float, bad: BadSamples):
        self.stream, self.mixture, self.grad_accum, self.caption_dropout = stream, mixture, grad_accum, caption_dropout
        self.seed, self.stage, self.bad = seed, stage, bad
        self.fallback = next(t for t, w in zip(TASKS, mixture, strict=True) if w > 0)  # no task anywhere: run one
        self._batches = None
        self._sent = 0  # the stream's rows already gathered
        if stream.gather is None:  # the bad share is the run's: every process's count
            stream.gather = gather_objects

    def step_picks(self, step: int) -> list[list[Pick]]:
        """This process's picks of each micro-batch of step ``step``."""
        if self._batches is None:  # started at the position a resumed run loaded
            self._batches = self.stream.indexed()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.stage * 10_007 + step)
        shape = (self.grad_accum, self.stream.batch_size)
        draws = torch.rand((*shape, 2), generator=g).tolist()
        drops = torch.randint(len(CFG_DROPS), shape, generator=g).tolist()  # a dropped edit's unconditional row
        micro = []
        for m in range(self.grad_accum):
            picks = []
            for i, sample in next(self._batches):
                task = choose_task(sample, self.mixture, draws[m][i][0])
                if task is not None:
                    dropped = task == "generation" and draws[m][i][1] < self.caption_dropout
                    drop = CFG_DROPS[drops[m][i]] if dropped and sample.instruction is not None else None
                    picks.append(Pick(task, sample, dropped, drop))
            micro.append(picks)
        return micro

    def gather_bad(self) -> None:
        """Collective: the rows every process's stream listed since the last call join ``bad``, by rank."""
        new = self.stream.bad.rows[self._sent:]
        self._sent += len(new)
        for rows in gather_objects(new):
            self.bad.rows.extend(rows)

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "bad_samples": list(self.bad.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.bad.rows = list(state["bad_samples"])
        self.stream.earlier_bad = list(self.bad.rows)  # they count in the run's bad share
