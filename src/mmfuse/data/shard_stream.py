"""A training split streamed from LitData chunks (imports LitData: loaded only when a run reads shards).

LitData assigns the chunks (and intervals of chunks) of an epoch to `ranks x loader workers`, each record to exactly
one of them, in an order drawn from `seed + epoch` (`shuffle=True`). Under DDP it drops the last records that would
give one rank more batches than another (`drop_last`, at most `world_size x batch_size - 1` a epoch, which differ
from epoch to epoch): otherwise the ranks would wait on each other forever at the last step.

The loader's state (`state_dict`: the epoch and the records yielded in it) is saved in every checkpoint; a resumed run
hands it back (`mmfuse.train.checkpoints.LoaderResume`) and the epoch goes on from there: no record of it read twice or
skipped. A state saved for another split folder or seed is refused with one line.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex
from litdata.utilities.env import _DistributedEnv

from mmfuse.data.shards import BatchSamples, ShardError, ShardSamples


class ShardStream(StreamingDataset):
    """LitData's `StreamingDataset` over one split; its items become samples a batch at a time (`ShardSamples.batch`,
    in the loader's collate_fn).

    The world (ranks) is read again at each epoch start: the loader is built before Lightning starts the process
    group, and LitData reads it once, when built.
    """

    def __init__(self, path: str, samples: ShardSamples, shuffle: bool, seed: int = 0) -> None:
        super().__init__(path, shuffle=shuffle, seed=seed, drop_last=False)
        self.samples = samples

    def _read_world(self) -> None:
        """The running process group's world (the loader is built before it starts); `set_drop_last` also drops
        LitData's cached shuffler, which keeps the drop_last it was made with."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.distributed_env = _DistributedEnv.detect()
            self.set_drop_last(True)  # the same number of batches on every rank

    def set_epoch(self, current_epoch: int) -> None:
        self._read_world()
        super().set_epoch(current_epoch)

    def get_len(self, num_workers: int, batch_size: int) -> int:
        """This rank's items (Lightning reads it for the schedule's length, `estimated_stepping_batches`)."""
        self._read_world()
        n = super().get_len(num_workers, batch_size)
        if n == 0 and self.drop_last:  # drop_last: several processes (`_read_world`)
            world = self.distributed_env.world_size
            raise ShardError(
                f"data.batch_size={batch_size} is more than this process's share of the training records ({world} "
                "processes): a streamed epoch under DDP keeps whole batches only, so no step would run; lower "
                f"data.batch_size to at most the training records / {world}"
            )
        return n

    def __getitem__(self, index: Any) -> tuple[int, dict[str, Any]]:
        """(the record's position in the split, its shard item): the loader's collate_fn makes the batch's samples
        together (`stream_loader`)."""
        if type(index) is ChunkedIndex and self.cache is not None:  # from `__next__`: LitData's own read, directly
            return index.index, self.cache[index]
        return int(index), super().__getitem__(index)


class ShardLoader(StreamingDataLoader):
    """LitData's loader: it sets each epoch on the dataset and keeps the stream's state (records seen)."""

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Go on from a saved position. ValueError (one line) when it was saved for another split or seed: LitData
        would find it out inside a loader worker, as a traceback."""
        saved = obj.get("dataset") if isinstance(obj, dict) else None
        if not isinstance(saved, dict) or "current_epoch" not in obj:
            raise ValueError("its training loader state is not a LitData streaming state")
        here = self.dataset
        if (saved.get("input_dir_path"), saved.get("seed")) != (here.input_dir.path, here.seed):
            raise ValueError(
                f"its training loader stopped in {saved.get('input_dir_path')} (seed {saved.get('seed')}), this run "
                f"streams {here.input_dir.path} (seed {here.seed}); resume with the same shards or start a new run"
            )
        super().load_state_dict(obj)

    def __iter__(self) -> Any:
        """One epoch. A restored position holds for the epoch it was saved in only: LitData forgets it when an epoch
        is read to its end, which Lightning never does (it stops after `len(loader)` batches), so without this the
        next epoch would start from the stale position again (and read nothing)."""
        for i, batch in enumerate(super().__iter__()):
            if i == 0:  # the epoch's iterator exists (its workers were handed their first indices): done restoring
                self.restore = False
            yield batch


def stream_loader(dataset: ShardStream, batch_size: int, collate_fn: Any, num_workers: int) -> ShardLoader:
    """The training split's loader (`ShardLoader`): `collate_fn` receives the batch's samples."""
    return ShardLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=BatchSamples(dataset.samples, collate_fn),
        num_workers=num_workers,
        persistent_workers=False,
    )
