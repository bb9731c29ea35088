"""The epoch shuffles come from torch's RandomSampler and draw exactly the orders of the hand-written samplers
they replace (`randperm` with a generator seeded `seed * 100_003 + epoch`), so training is unchanged bit for bit."""

from __future__ import annotations

import random

import pytest
import torch

from mmfuse.data.sampling import EpochRandomSampler, epoch_generator, epoch_seed
from mmfuse.train.data import IndexBatchSampler, LengthBucketSampler


def old_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the former EpochShuffleSampler / IndexBatchSampler."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


@pytest.mark.parametrize(("n", "seed"), [(1, 0), (37, 0), (1000, 7), (5, 123456)])
def test_the_random_sampler_draws_the_old_order_of_each_epoch(n: int, seed: int) -> None:
    sampler = EpochRandomSampler(range(n), seed)
    for epoch in (0, 1, 5):
        sampler.set_epoch(epoch)
        assert list(sampler) == old_order(n, seed, epoch)
        assert list(sampler) == old_order(n, seed, epoch)  # a second pass of the same epoch repeats it
    assert epoch_seed(seed, 3) == seed * 100_003 + 3
    assert torch.equal(torch.randperm(9, generator=epoch_generator(seed, 2)), torch.tensor(old_order(9, seed, 2)))


def test_the_order_is_drawn_at_the_first_index_after_set_epoch() -> None:
    sampler = EpochRandomSampler(range(20), 1)
    it = iter(sampler)  # Lightning creates the iterator, then calls set_epoch
    sampler.set_epoch(4)
    assert list(it) == old_order(20, 1, 4)


def test_index_batches_are_the_old_batches() -> None:
    batches = IndexBatchSampler(23, 5, shuffle=True, seed=2)
    batches.set_epoch(3)
    got = list(batches)
    assert all(b.dtype == torch.long for b in got) and len(got) == len(batches) == 5
    assert torch.equal(torch.cat(got), torch.tensor(old_order(23, 2, 3))) and [len(b) for b in got] == [5] * 4 + [3]
    in_order = IndexBatchSampler(7, 3, shuffle=False)
    in_order.set_epoch(2)
    assert [b.tolist() for b in in_order] == [[0, 1, 2], [3, 4, 5], [6]]


def test_length_buckets_keep_their_seed() -> None:
    lengths = [(i * 7) % 11 for i in range(30)]
    sampler = LengthBucketSampler(lengths, 4, seed=5, pool=2)
    sampler.set_epoch(2)
    rng = random.Random(5 * 100_003 + 2)
    idx = list(range(30))
    rng.shuffle(idx)
    expected = []
    for a in range(0, 30, 8):
        chunk = sorted(idx[a : a + 8], key=lengths.__getitem__)
        expected += [chunk[b : b + 4] for b in range(0, len(chunk), 4)]
    rng.shuffle(expected)
    assert list(sampler) == expected
