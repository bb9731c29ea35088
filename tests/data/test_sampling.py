"""The epoch shuffles come from torch's RandomSampler and draw exactly the orders of the hand-written samplers
they replace (`randperm` with a generator seeded `seed * 100_003 + epoch`), so training is unchanged bit for bit."""

from __future__ import annotations

import random

import pytest
import torch

from mmfuse.data.sampling import EpochDistributedSampler, EpochRandomSampler, epoch_generator, epoch_seed
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


class _Rank(EpochDistributedSampler):
    """The sampler as rank `r` of `w` sees it (no process group in a unit test)."""

    def __init__(self, n: int, seed: int, r: int, w: int) -> None:
        super().__init__(range(n), seed)
        self._r, self._w = r, w

    num_replicas = property(lambda self: self._w)  # type: ignore[assignment]
    rank = property(lambda self: self._r)  # type: ignore[assignment]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_ranks_batches_together_are_one_process_batches_of_the_world_size(seed: int) -> None:
    n, b, w = 24, 3, 2
    for epoch in (0, 1):
        ranks = [_Rank(n, seed, r, w) for r in range(w)]
        for s in ranks:
            s.set_epoch(epoch)
        single = EpochRandomSampler(range(n), seed)
        single.set_epoch(epoch)
        one = list(single)
        per_rank = [list(s) for s in ranks]
        assert sorted(i for p in per_rank for i in p) == list(range(n))  # each record once an epoch
        for k in range(n // (w * b)):
            together = sorted(i for p in per_rank for i in p[k * b : (k + 1) * b])
            assert together == sorted(one[k * w * b : (k + 1) * w * b])


def test_an_uneven_split_is_padded_like_torchs_distributed_sampler() -> None:
    ranks = [_Rank(5, 3, r, 2) for r in range(2)]
    got = [list(s) for s in ranks]
    assert [len(g) for g in got] == [3, 3] and len(ranks[0]) == 3
    assert set(got[0]) | set(got[1]) == set(range(5))
    alone = EpochDistributedSampler(range(5), seed=3)  # no process group: a world of one, all records
    assert alone.num_replicas == 1 and sorted(alone) == list(range(5)) and len(alone) == 5
