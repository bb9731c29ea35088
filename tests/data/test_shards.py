"""Shards (mmfuse.data.shards, shard_stream): every record once per epoch over ranks x workers, seeded epoch order,
the manifest check of every file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from litdata.utilities.env import _DistributedEnv

from mmfuse.data.records import Record
from mmfuse.data.shard_stream import ShardStream, stream_loader
from mmfuse.data.shards import (
    ShardError,
    ShardSamples,
    ShardSplit,
    item_record,
    read_manifest,
    record_item,
    verify_shards,
    write_manifest,
    write_split,
)

N = 53  # not a multiple of ranks x workers x batch


def _indices(batch: list[dict[str, Any]]) -> list[int]:
    return [s["index"] for s in batch]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    records = [
        Record({"table": (float(i), "a" if i % 2 else None)}, {"y": i % 3}, f"r.jsonl:{i + 1}") for i in range(N)
    ]
    split = write_split(root, "train", (record_item(i, r, {}) for i, r in enumerate(records)), chunk_bytes="600B")
    write_manifest(root, {"splits": {"train": split}})
    assert len([f for f in split["files"] if "chunk" in f]) > 4  # several chunks to partition
    return root


def _epoch_orders(root: Path, rank: int, world: int, epochs: int, seed: int = 3) -> list[list[int]]:
    """The indices one simulated rank reads each epoch through 2 loader worker processes."""
    samples = ShardSamples({}, {}, "train", train=True)
    stream = ShardStream(str(root / "train"), samples, shuffle=True, seed=seed)
    stream.distributed_env = _DistributedEnv(world_size=world, global_rank=rank, num_nodes=1)
    loader = stream_loader(stream, batch_size=4, collate_fn=_indices, num_workers=2)
    return [[i for batch in loader for i in batch] for _ in range(epochs)]


def test_two_ranks_times_two_workers_read_every_record_once_per_epoch(shard_set: Path) -> None:
    per_rank = [_epoch_orders(shard_set, rank, 2, epochs=2) for rank in (0, 1)]
    for epoch in range(2):
        seen = per_rank[0][epoch] + per_rank[1][epoch]
        assert sorted(seen) == list(range(N)), f"epoch {epoch}: a record read twice or lost"
        assert per_rank[0][epoch] and per_rank[1][epoch]
    assert per_rank[0][0] != per_rank[0][1]  # a new order each epoch
    assert _epoch_orders(shard_set, 0, 2, epochs=2) == per_rank[0]  # the same seed and epoch: the same order
    assert _epoch_orders(shard_set, 0, 2, epochs=1, seed=4)[0] != per_rank[0][0]


def test_an_item_holds_the_record_and_its_file() -> None:
    record = Record({"image": "/data/a.png", "table": (1.0, None)}, {"y": "cat"}, "r.jsonl:3", "train", "g1")
    item = record_item(7, record, {"image": b"\x89PNG"})
    back, files = item_record(item, "train")
    assert back == record and files == {"image": b"\x89PNG"} and item["index"] == 7


def test_every_file_is_checked_against_the_manifest(shard_set: Path, tmp_path: Path) -> None:
    manifest = read_manifest(shard_set)
    verify_shards(shard_set, manifest)
    chunk = next(iter(f for f in manifest["splits"]["train"]["files"] if "chunk" in f))
    data = (shard_set / chunk).read_bytes()
    damaged = {
        "flipped": data[:10] + bytes([data[10] ^ 1]) + data[11:],
        "truncated": data[:-3],
    }
    for name, content in damaged.items():
        copy = tmp_path / name
        copy.mkdir()
        (copy / "train").mkdir()
        for p in (shard_set / "train").iterdir():
            (copy / "train" / p.name).write_bytes(p.read_bytes())
        (copy / chunk).write_bytes(content)
        with pytest.raises(ShardError, match=f"{copy / chunk}: shard (damaged|truncated)"):
            verify_shards(copy, manifest)
        (copy / chunk).unlink()
        with pytest.raises(ShardError, match=f"{copy / chunk}: shard missing"):
            verify_shards(copy, manifest)


def test_a_folder_that_is_not_a_shard_set_is_named(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="not a shard folder"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ShardError, match="no mmfuse_manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "mmfuse_manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ShardError, match="not an mmfuse shard manifest"):
        read_manifest(tmp_path)
    assert len(ShardSplit(str(tmp_path), "train", 5)) == 5
