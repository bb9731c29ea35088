"""Epoch-seeded shuffling: an epoch's order depends on (seed, epoch) only, so a resumed run repeats it.

Every shuffling sampler of mmfuse seeds its epoch with `epoch_seed`; `EpochRandomSampler` is torch's
`RandomSampler` whose generator is re-seeded that way at each pass (Lightning calls `set_epoch` each epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler


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
