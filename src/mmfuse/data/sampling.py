"""Epoch-seeded shuffling: an epoch's order depends on (seed, epoch) only, so a resumed run repeats it.

Every shuffling sampler of mmfuse seeds its epoch with `epoch_seed`; `EpochRandomSampler` is torch's
`RandomSampler` whose generator is re-seeded that way at each pass (Lightning calls `set_epoch` each epoch);
`EpochDistributedSampler` draws the same permutation and deals it out to the ranks, so N processes at batch b see
the records of one process's batches of N x b.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, RandomSampler


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s shuffle in a run seeded with `seed`."""
    return seed * 100_003 + epoch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded with `epoch_seed(seed, epoch)`."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


class EpochRandomSampler(RandomSampler):
    """torch's `RandomSampler` (no replacement) seeded by (seed, epoch): each pass draws the same permutation as
    `torch.randperm(len(data_source), generator=epoch_generator(seed, epoch))`.

    Args:
        data_source: what is sampled (only its length is used).
        seed: the run's seed.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # A generator: seeded at the first index, after Lightning's `set_epoch` (it creates the epoch's iterator
        # before calling `set_epoch`, which matters on resume).
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))
        yield from super().__iter__()


class EpochDistributedSampler(DistributedSampler):
    """torch's `DistributedSampler` over `EpochRandomSampler`'s permutation of (seed, epoch): rank r of W takes
    positions r, r + W, ... of it (padded, as `DistributedSampler` pads, to a multiple of W). So global batch k of W
    processes at batch b holds the records of batch k of one process at batch W x b, at every seed.

    The world is read when the sampler is used (the loader is built before Lightning starts the process group;
    Lightning keeps a `DistributedSampler` it is given).

    Args:
        data_source: what is sampled (only its length is used).
        seed: the run's seed.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:  # noqa: D107 (no super: the world is read later)
        self.dataset, self.seed, self.epoch = data_source, seed, 0
        self.shuffle, self.drop_last = True, False

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:  # type: ignore[override]
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        return math.ceil(len(self.dataset) / self.num_replicas)

    @property
    def total_size(self) -> int:  # type: ignore[override]
        return self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.dataset), generator=epoch_generator(self.seed, self.epoch)).tolist()
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
