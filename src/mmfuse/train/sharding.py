"""Evaluation under DDP: every record counted exactly once, and the same number of batches on every rank.

PyTorch's `DistributedSampler` evens out the shards by repeating records, so validation and test
metrics under DDP would count some records twice. Here rank r evaluates positions r, r + W, ... of
the split (W ranks); the shards are evened out with repeated records too (so every rank runs the
same number of forward passes, and DDP's buffer broadcast stays in step), but those repeats carry
`pad = True` in the batch and the module leaves them out of every loss and metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class PaddedEvalSampler(DistributedSampler):
    """Rank r gets positions r, r + W, ... of `range(ceil(n / W) * W)`; a position p >= n is the padding
    index `n + p % n` (the record `p % n`, flagged). The rank is read when iterating, once DDP has started.

    Args:
        n: records in the split.
        num_replicas: the world size W.
        rank: this process's rank (default: read from torch.distributed when iterating).
    """

    def __init__(self, n: int, num_replicas: int, rank: int | None = None) -> None:  # noqa: D107
        # DistributedSampler.__init__ is not called: it would need the process group, which starts later.
        self.n, self.num_replicas, self._rank = n, num_replicas, rank
        self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.shuffle, self.drop_last, self.epoch, self.seed = False, False, 0, 0

    @property
    def rank(self) -> int:  # type: ignore[override]
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @rank.setter
    def rank(self, value: int) -> None:
        self._rank = value

    def __iter__(self) -> Iterator[int]:
        positions = range(self.rank, self.total_size, self.num_replicas)
        return iter(p if p < self.n else self.n + p % self.n for p in positions)

    def __len__(self) -> int:
        return self.num_samples


class _FlagPadding(Dataset):
    """Index i < n: the record i; index n + j: the record j again, flagged as padding."""

    def __init__(self, base: Dataset) -> None:
        self.base, self.n = base, len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, bool]:
        return self.base[i % self.n], i >= self.n


class _CollatePadding:
    """The base collate, plus `pad` (B,) bool."""

    def __init__(self, base: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.base = base

    def __call__(self, items: list[tuple[Any, bool]]) -> dict[str, Any]:
        batch = self.base([sample for sample, _ in items])
        batch["pad"] = torch.tensor([flag for _, flag in items], dtype=torch.bool)
        return batch


def shard_eval_loader(loader: DataLoader, world_size: int) -> DataLoader:
    """`loader` (an in-order evaluation loader) re-built to shard its records over `world_size` DDP ranks."""
    if world_size <= 1 or len(loader.dataset) == 0:  # type: ignore[arg-type]
        return loader
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", 1)
    return DataLoader(
        _FlagPadding(loader.dataset),
        batch_size=batch_size,
        sampler=PaddedEvalSampler(len(loader.dataset), world_size),  # type: ignore[arg-type]
        collate_fn=_CollatePadding(loader.collate_fn),
        num_workers=loader.num_workers,
        persistent_workers=loader.persistent_workers,
        pin_memory=loader.pin_memory,
    )
