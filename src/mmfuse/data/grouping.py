"""Batches that keep records sharing an input together (`data.group_batches: true`), for one encoder pass per
distinct input in a batch when an encoder is fine-tuned (the batch's `UniqueInputs`).

Shapes: N records, G groups, W processes (DDP ranks), B batch.

Trade-off: every record is still visited exactly once an epoch, so the gradient summed over an epoch (the
expected gradient per epoch) is that of uniform sampling; but the records of one batch are correlated (about
B / group size distinct inputs instead of about B), so a batch's gradient has a higher variance than a uniform
batch's of the same size: noisier steps, which a smaller learning rate or a larger batch offsets. In exchange
the encoder runs on the distinct inputs only (easy-VQA: about 8 questions per image, so about 8x fewer image
passes per batch).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from mmfuse.data.records import DataError
from mmfuse.data.sampling import epoch_generator


def input_groups(refs: Sequence[Hashable | None]) -> torch.Tensor:
    """(N,) long group id of each record: records with the same reference share one; a missing one (None) is
    its own group."""
    ids: dict[Hashable, int] = {}
    out = []
    for i, ref in enumerate(refs):
        out.append(ids.setdefault(("ref", ref) if ref is not None else ("missing", i), len(ids)))
    return torch.tensor(out, dtype=torch.long)


class GroupedBatchSampler(DistributedSampler):
    """Whole batches of record positions, the records of a group (a shared input) next to each other.

    Each epoch (seeded by seed and epoch, so a resumed run repeats it): the records are shuffled within their
    groups, the groups are shuffled, and the sequence is cut into T = W * ceil(N / (W * B)) batches whose sizes
    differ by at most one (each <= B; a group may straddle two batches). Rank r takes batches r, r + W, ...:
    every record is in exactly one batch of one rank, and every rank runs the same number of steps.
    It is a `DistributedSampler`, so Lightning keeps it under DDP instead of injecting its own.

    Args:
        groups: (N,) long group id of each record (`input_groups`).
        batch_size: B, records per batch at most.
        seed: seed of the shuffles.
        num_replicas / rank: W and r; default read from torch.distributed when iterating (1 and 0 without it).
    """

    def __init__(  # noqa: D107 - DistributedSampler.__init__ needs a process group that starts later
        self,
        groups: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.groups, self.batch_size, self.seed, self.epoch = groups.long(), batch_size, seed, 0
        self.n, self.n_groups = len(groups), int(groups.max()) + 1 if len(groups) else 0
        self._world, self._rank = num_replicas, rank
        self.shuffle, self.drop_last = True, False

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        if self._world is not None:
            return self._world
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:  # type: ignore[override]
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[torch.Tensor]:
        """All T batches of this epoch (every rank's), in order: (<= B,) long record positions each."""
        world = self.num_replicas
        if self.n < world:
            raise DataError(f"data.group_batches: {self.n} training records cannot fill batches on {world} processes")
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.n, generator=g)  # random order within each group ...
        group_rank = torch.randperm(self.n_groups, generator=g)  # ... and of the groups
        order = order[torch.argsort(group_rank[self.groups[order]], stable=True)]  # groups contiguous
        return list(torch.tensor_split(order, len(self) * world))

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        # A generator: the order is drawn at the first batch, after Lightning's `set_epoch`.
        yield from (b.tolist() for b in self.batches()[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        """Batches per rank: ceil(N / (W * B))."""
        return math.ceil(self.n / (self.num_replicas * self.batch_size))


class BatchFetch(Dataset):
    """`dataset[list of positions]` -> the samples of that batch (`base.__getitems__`), for a DataLoader whose
    sampler yields whole batches (`batch_size=None`)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, indices: list[int]) -> list[Any]:
        return self.base.__getitems__(indices)  # type: ignore[attr-defined]
