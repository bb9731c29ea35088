"""A training split streamed from LitData chunks (imports LitData: loaded only when a run reads shards).

LitData assigns the chunks (and intervals of chunks) of an epoch to `ranks x loader workers`, each record to exactly
one of them, in an order drawn from `seed + epoch` (`shuffle=True`). Under DDP it drops the last records that would
give one rank more batches than another (`drop_last`, at most `world_size x batch_size - 1` a epoch, which differ
from epoch to epoch): otherwise the ranks would wait on each other forever at the last step.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from litdata import StreamingDataLoader, StreamingDataset
from litdata.utilities.env import _DistributedEnv

from mmfuse.data.shards import ShardSamples


class ShardStream(StreamingDataset):
    """LitData's `StreamingDataset` over one split whose items come out as samples (`ShardSamples`).

    The world (ranks) is read again at each epoch start: the loader is built before Lightning starts the process
    group, and LitData reads it once, when built.
    """

    def __init__(self, path: str, samples: ShardSamples, shuffle: bool, seed: int = 0) -> None:
        super().__init__(path, shuffle=shuffle, seed=seed, drop_last=False)
        self.samples = samples

    def set_epoch(self, current_epoch: int) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.distributed_env = _DistributedEnv.detect()
            self.drop_last = True  # the same number of batches on every rank
        super().set_epoch(current_epoch)

    def __getitem__(self, index: Any) -> dict[str, Any]:
        return self.samples(super().__getitem__(index))


def stream_loader(dataset: ShardStream, batch_size: int, collate_fn: Any, num_workers: int) -> StreamingDataLoader:
    """LitData's loader: it sets each epoch on the dataset and keeps the stream's state (records seen)."""
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=False,
    )
