"""Streamed sharded data (``unigen.data.shards``): read lazily, split across processes, resumable mid-epoch.

The order is a pure function of the seed: epoch ``e`` reads the shards in ``randperm`` order seeded with
(seed, e), each shard's records in stored order. Step ``k`` trains on the next ``batch_size`` records of that
one global order, and process ``rank`` of ``world`` takes its contiguous share of them (as
``unigen.training.mixture.share`` does), so N processes train on exactly the batches one process would. Every
process reads every shard's bytes but decodes only its own share: the price of that equality.

The position (epoch, shard, records read in it) after the last batch is :meth:`ShardStream.state_dict`; a
stream given it back (:meth:`ShardStream.load_state_dict`) continues with the very next batch, mid-epoch.
A bad record (an image beyond the bounds, corrupt, a malformed record, or one the ``check`` given by the trainer
refuses: codes its VQ could not have made, a row too long) is skipped and listed in the stream's
:class:`~unigen.data.bad_samples.BadSamples`; the batch is that much smaller on the process that drew it.

``max_bad_fraction`` bounds the bad share of the whole run, not of one process's share: a process may draw all
the bad records of a run that is fine as a whole. So once the run has decoded 200 records, after each batch
every process counts the bad records of all processes through ``gather`` (``all_gather_object``; a collective,
safe here because every process reaches the same batch: the counts decoded are a function of the batch alone)
and all stop together, with the same message. The counts before a resumed position travel in the state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from unigen.data.bad_samples import BadSamples
from unigen.data.manifest import Sample
from unigen.data.shards import KEY, list_shards, read_shard, record_sample
from unigen.errors import ArgumentError, DataError

MIN_SEEN_FOR_SHARE = 200  # the bad share is checked once the run decoded this many records


class ShardStream:
    """Batches of :class:`Sample` (this process's share of each global batch of ``batch_size`` records)."""

    def __init__(self, source: str | Path, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 bad: BadSamples | None = None, check: Callable[[Sample], str | None] | None = None,
                 gather: Callable[[object], list] | None = None):
        if batch_size < 1 or world < 1 or not 0 <= rank < world or batch_size % world:
            raise ArgumentError(f"a global batch of {batch_size} cannot be split evenly over {world} process(es) "
                                f"(rank {rank})")
        self.shards = list_shards(source)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.bad = BadSamples() if bad is None else bad
        self.check = check  # a decoded sample -> why the trainer cannot use it, or None
        # every process's value, by rank (torch.distributed.all_gather_object); None: this process's share alone
        self.gather = gather
        self.position = {"epoch": 0, "shard": 0, "offset": 0}
        self.seen = 0  # records this process decoded since it started
        self.earlier_seen = 0  # records all processes decoded before the resumed position
        self.earlier_bad: list[dict] = []  # the bad ones among them (given by the trainer, which keeps the list)

    def shard_order(self, epoch: int) -> list[Path]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=gen).tolist()]

    def state_dict(self) -> dict:
        """Where the next batch starts, what the order depends on, and how many records every process decoded
        (plain ints: any checkpoint holds it)."""
        return {**self.position, "seed": self.seed, "shards": len(self.shards), "batch_size": self.batch_size,
                "seen": self.seen_by_all()}

    def load_state_dict(self, state: dict) -> None:
        want = {"seed": self.seed, "shards": len(self.shards), "batch_size": self.batch_size}
        got = {k: state.get(k) for k in want}
        if got != want:
            raise DataError(f"the streamed data's resume state was saved for {got}, but this run has {want}; the "
                            "order would differ: resume with the same data, seed and global batch size")
        self.position = {k: int(state[k]) for k in ("epoch", "shard", "offset")}
        self.earlier_seen, self.seen = int(state.get("seen", 0)), 0

    def seen_by_all(self) -> int:
        """Records decoded by every process so far (each decodes its share of every batch: no count is sent)."""
        return self.earlier_seen + self.seen * (self.world if self.gather is not None else 1)

    def check_bad_share(self) -> None:
        """Stop when the run's bad share passes ``max_bad_fraction`` (collective when ``gather`` is given)."""
        parts = [(len(self.bad), self.bad.rows[:3])]
        if self.gather is not None:
            parts = self.gather(parts[0])
        first = self.earlier_bad + [r for _, rows in parts for r in rows]
        self.bad.check_share(self.seen_by_all(), "streamed samples", rows=first,
                             count=len(self.earlier_bad) + sum(n for n, _ in parts))

    def _records(self) -> Iterator[tuple[dict, dict]]:
        """(position after the record, record) from the current position on, epoch after epoch."""
        epoch, shard, offset = self.position["epoch"], self.position["shard"], self.position["offset"]
        while True:
            order, read_any = self.shard_order(epoch), offset > 0 or shard > 0
            for s in range(shard, len(order)):
                for i, record in enumerate(read_shard(order[s])):
                    if i < offset:
                        continue  # read past, not decoded: before the resumed position
                    read_any = True
                    yield {"epoch": epoch, "shard": s, "offset": i + 1}, record
                offset = 0
            if not read_any:
                raise DataError(f"the {len(order)} shard(s) of the streamed data hold no records")
            epoch, shard = epoch + 1, 0

    def indexed(self) -> Iterator[list[tuple[int, Sample]]]:
        """This process's share of each global batch: (the sample's index in the global batch, the sample)."""
        records = self._records()
        share = self.batch_size // self.world
        while True:
            batch = [next(records) for _ in range(self.batch_size)]
            samples = []
            for i in range(self.rank * share, (self.rank + 1) * share):
                _, record = batch[i]
                sample, problem = record_sample(record)
                if problem is None and self.check is not None:
                    problem = self.check(sample)
                if problem is None:
                    samples.append((i, sample))
                else:
                    self.bad.add(record[KEY], problem)
            self.seen += share
            if self.seen_by_all() >= MIN_SEEN_FOR_SHARE:
                self.check_bad_share()
            self.position = batch[-1][0]
            yield samples

    def __iter__(self) -> Iterator[list[Sample]]:
        return ([sample for _, sample in batch] for batch in self.indexed())


def text_samples(source: str | Path) -> Iterator[Sample]:
    """Every record's sample in stored order, images left undecoded: the texts a fresh model's tokenizer learns
    (one pass over the shards; malformed records are left out here and listed when training reaches them)."""
    from tqdm.auto import tqdm

    for shard in tqdm(list_shards(source), desc="reading texts", unit="shard", leave=False, mininterval=1.0):
        for record in read_shard(shard):
            sample, _ = record_sample(record, decode=False)
            if sample is not None:
                yield sample
