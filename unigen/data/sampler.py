"""Which samples each step trains on, for the image trainers: a seeded permutation per epoch, so the data
position at any step is a pure function of (seed, step) and resume is exact; and the held-out split."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from unigen.errors import DataError


def holdout_size(val_size: int, n_records: int) -> int:
    """Images held out for evaluation when no val_data is given: ``val_size``, at most a tenth of the data."""
    return min(val_size, n_records // 10)


def split_holdout(records: list, n_val: int, seed: int) -> tuple[list, list]:
    """A fixed random ``n_val`` records for evaluation; the rest for training."""
    if n_val <= 0:
        return records, []
    if n_val >= len(records):
        raise DataError(f"val_size={n_val} leaves no training data ({len(records)} records)")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [records[i] for i in sorted(val)]


class EpochBatches:
    """Infinite batches of indices: epoch e is ``randperm(n)`` seeded with (seed, e), remainder dropped. With
    ``world`` processes a step's global batch is ``batch_size * world`` indices in that order, and process ``rank``
    takes its ``batch_size`` of them: the same images in the same order as one process at the global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1):
        if n < batch_size * world:
            across = f" x {world} processes" if world > 1 else ""
            raise DataError(f"batch_size={batch_size}{across} is larger than the {n} training images")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.global_batch, self.rank = batch_size * world, rank
        self.per_epoch = n // self.global_batch

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of the batch used at ``step``."""
        return divmod(step, self.per_epoch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, pos = self.position(self.start_step)
        while True:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=gen).tolist()
            for b in range(pos, self.per_epoch):
                first = b * self.global_batch + self.rank * self.batch_size
                yield perm[first:first + self.batch_size]
            epoch, pos = epoch + 1, 0


def collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([img for img, _ in items]), [text for _, text in items]


def batch_loader(dataset, batch_size: int, seed: int, start_step: int, num_workers: int = 0, rank: int = 0,
                 world: int = 1):
    """Iterator of (uint8 images, captions) starting at the batch of ``start_step``: process ``rank``'s share."""
    batches = EpochBatches(len(dataset), batch_size, seed, start_step, rank, world)
    # its own generator: creating the iterator must not draw from the global RNG (resume would drift)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                                         persistent_workers=num_workers > 0, generator=torch.Generator())
    return iter(loader)
