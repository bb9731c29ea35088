"""Shards (mmfuse.data.shards, shard_stream): every record once per epoch over ranks x workers, seeded epoch order,
each sample at its record's position, the records and samples of the in-memory path, the manifest check of every
file, an older shard format refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from litdata import StreamingDataset
from litdata.utilities.env import _DistributedEnv

from mmfuse.data.dataset import MultiModalDataset
from mmfuse.data.records import DataError, Record
from mmfuse.data.shard_stream import ShardStream, stream_loader
from mmfuse.data.shards import (
    NUM_KEY,
    ShardError,
    ShardRows,
    ShardSamples,
    ShardSplit,
    decode_records,
    item_record,
    json_ints_fit,
    parse_json,
    read_manifest,
    record_item,
    split_of,
    verify_shards,
    write_manifest,
    write_split,
)
from mmfuse.encoders.embedding import EmbeddingEncoder
from mmfuse.encoders.tabular import TabularEncoder
from mmfuse.tasks import build_task

N = 53  # not a multiple of ranks x workers x batch


def _indices(batch: list[dict[str, Any]]) -> list[int]:
    return [s["index"] for s in batch]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    records = [
        Record({"table": (float(i), "a" if i % 2 else None)}, {"y": i % 3}, f"r.jsonl:{i + 1}") for i in range(N)
    ]
    split = write_split(root, "train", (record_item(r, {}, {}) for r in records), chunk_bytes="600B")
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


def test_an_item_holds_the_record_its_encoded_labels_and_its_file() -> None:
    """A float vector travels in the typed `num` column, exactly; other references stay JSON (as tuples again); the
    labels of the given tasks are stored encoded (a class index, a multi-hot list, a float; None where missing)."""
    vector = (0.1, -2.5e-300, 1 / 3, 7.0)
    record = Record(
        {"image": "/data/a.png", "table": (1.0, None, "k", 3), "emb": vector, "nested": ((1.5, "a"), 2.0)},
        {"y": "cat", "size": "0.25", "tags": ["a", "b"], "other": "x"},
        "r.jsonl:3",
        "train",
        "g1",
    )
    tasks = {
        "y": build_task("y", "multiclass", classes=["ant", "cat"]),
        "size": build_task("size", "regression"),
        "tags": build_task("tags", "multilabel", classes=["a", "b", "c"]),
        "flag": build_task("flag", "binary"),
    }
    encoded = {"y": 1, "size": 0.25, "tags": [1.0, 1.0, 0.0], "flag": None}
    item = record_item(record, {"image": b"\x89PNG"}, tasks)
    assert item[NUM_KEY].dtype == np.float64 and item[NUM_KEY].tolist() == list(vector)
    assert "0.1" not in item["record"] and "cat" not in item["record"]  # not in the JSON as well
    back, files = item_record(item, "train")
    assert back == Record(record.inputs, encoded, "r.jsonl:3", "train", "g1") and files == {"image": b"\x89PNG"}
    assert all(type(x) is float for x in back.inputs["emb"]) and type(back.labels["y"]) is int
    plain = record_item(record, {}, tasks, vectors=False)  # a split without vectors: no `num` column, all JSON
    assert NUM_KEY not in plain and item_record(plain, "train") == (back, {})


def test_the_vectors_of_a_batch_go_back_to_their_records() -> None:
    """One `tolist` for a batch's `num` columns: each record gets its own vectors, a record without one takes none."""
    records = [
        Record({"a": (1.0, 2.0), "b": (3.0,)}, {}, "r:1"),
        Record({"a": None, "b": (4.0,)}, {}, "r:2"),
        Record({"a": (5.0, 6.0), "b": None}, {}, "r:3"),
    ]
    raws = decode_records([record_item(r, {}, {}) for r in records])
    assert [raw[0] for raw in raws] == [r.inputs for r in records]


def _records(n: int) -> list[Record]:
    """Records with a table row, an embedding (missing in some), and labels of four task kinds (some missing)."""
    rng = np.random.default_rng(0)
    return [
        Record(
            {
                "table": (float(rng.normal()), None if i % 5 == 0 else f"k{i % 3}"),
                "emb": None if i % 4 == 3 else tuple(float(x) for x in rng.normal(size=3)),
            },
            {
                "kind": None if i % 6 == 0 else ["a", "b", "c"][i % 3],
                "size": float(i) / 7,
                "tags": ["x"] if i % 2 else ["x", "y"],
                "flag": i % 2,
            },
            f"r.jsonl:{i + 1}",
        )
        for i in range(n)
    ]


def _encoders_tasks() -> tuple[dict[str, Any], dict[str, Any]]:
    table = TabularEncoder(["v"], ["c"], stats={"v": {"mean": 0.1, "std": 2.0}}, categories={"c": ["k0", "k1"]}, dim=8)
    tasks = {
        "kind": build_task("kind", "multiclass", classes=["a", "b", "c"]),
        "size": build_task("size", "regression"),
        "tags": build_task("tags", "multilabel", classes=["x", "y"]),
        "flag": build_task("flag", "binary"),
    }
    return {"table": table, "emb": EmbeddingEncoder(3)}, tasks


def test_samples_from_shards_equal_the_in_memory_path(tmp_path: Path) -> None:
    """A batch made from shard items (`ShardSamples.batch`) and by position (`ShardRows`) gives the samples of
    `MultiModalDataset` over the same records: references, preprocessed inputs and encoded labels."""
    records = _records(30)
    encoders, tasks = _encoders_tasks()
    split = write_split(tmp_path, "train", (record_item(r, {}, tasks) for r in records))
    theirs = MultiModalDataset(records, tasks, encoders, train=True).__getitems__(list(range(30)))
    ds = StreamingDataset(str(tmp_path / "train"), shuffle=False)
    samples = ShardSamples(encoders, tasks, "train", train=True)
    rows = ShardRows(ShardSplit(str(tmp_path), "train", split["records"]), samples)
    for ours in (samples.batch([(i, ds[i]) for i in range(30)]), rows.__getitems__(list(range(30)))):
        assert len(ours) == 30
        for a, b in zip(ours, theirs, strict=True):
            assert a["index"] == b["index"] and a["refs"] == b["refs"] and a["labels"] == b["labels"]
            assert (a["inputs"]["emb"] is None) == (b["inputs"]["emb"] is None)
            if b["inputs"]["emb"] is not None:
                assert torch.equal(a["inputs"]["emb"], b["inputs"]["emb"])
            for k, v in b["inputs"]["table"].items():
                assert torch.equal(a["inputs"]["table"][k], v), k
    assert rows[7]["labels"] == theirs[7]["labels"]


def test_a_label_its_task_rejects_names_the_record() -> None:
    records = _records(4)
    records[2].labels["kind"] = "d"  # not a class of the task
    _, tasks = _encoders_tasks()
    with pytest.raises(DataError, match=r"^r\.jsonl:3: task 'kind': "):
        [record_item(r, {}, tasks) for r in records]


def test_items_encoded_for_other_tasks_are_refused_with_one_line(tmp_path: Path) -> None:
    encoders, tasks = _encoders_tasks()
    write_split(tmp_path, "train", (record_item(r, {}, tasks) for r in _records(4)))
    ds = StreamingDataset(str(tmp_path / "train"), shuffle=False)
    tasks["extra"] = build_task("extra", "regression")
    with pytest.raises(ShardError, match=r"^train: the shard items hold the labels of tasks kind, size, tags, flag, "):
        ShardSamples(encoders, tasks, "train", train=False).batch([(i, ds[i]) for i in range(4)])


def test_each_streamed_sample_is_its_records(shard_set: Path) -> None:
    """The position a streamed sample carries is its record's (the records of `shard_set` hold their position)."""
    table = TabularEncoder(["v"], ["c"], stats={"v": {"mean": 0.0, "std": 1.0}}, categories={"c": ["a"]}, dim=8)
    samples = ShardSamples({"table": table}, {}, "train", train=True)
    stream = ShardStream(str(shard_set / "train"), samples, shuffle=True, seed=1)
    seen = [(s["index"], s["refs"]["table"]) for batch in stream_loader(stream, 5, list, 0) for s in batch]
    assert sorted(i for i, _ in seen) == list(range(N))
    assert all(ref == (float(i), "a" if i % 2 else None) for i, ref in seen)


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


@pytest.mark.parametrize("old", [1, 2])
def test_a_shard_set_of_an_older_format_is_refused_with_one_line(shard_set: Path, tmp_path: Path, old: int) -> None:
    manifest = json.loads((shard_set / "mmfuse_manifest.json").read_text())
    (tmp_path / "mmfuse_manifest.json").write_text(json.dumps({**manifest, "format": old}))
    with pytest.raises(ShardError) as err:
        read_manifest(tmp_path)
    line = str(err.value)
    assert "\n" not in line and f"packed in shard format {old}, this mmfuse reads format 3; pack the data again" in line


def test_a_folder_that_is_not_a_shard_set_is_named(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="not a shard folder"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ShardError, match="no mmfuse_manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "mmfuse_manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ShardError, match="not an mmfuse shard manifest"):
        read_manifest(tmp_path)
    assert len(ShardSplit(str(tmp_path), "train", 5)) == 5


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(json_values)
@example([-(2**63) - 1, 2**63, 2**64, 10**30, float("inf"), float("nan"), 1e-320, "1234567890123456789012"])
def test_the_fast_json_parser_reads_what_the_standard_one_reads(value: Any) -> None:
    """Where `pack` lets orjson read a split (`json_ints_fit`), it gives what `json.loads` gives: NaN, Infinity and
    the integers around 64 bits too."""
    text = json.dumps(value)
    assert json.dumps(parse_json(text, fast=json_ints_fit(text))) == json.dumps(json.loads(text))


def test_a_split_with_an_integer_beyond_64_bits_is_read_exactly(tmp_path: Path) -> None:
    big = -(2**63) - 1  # orjson would read it as -9.223372036854776e+18
    plain = [Record({"table": (float(i), "a")}, {"y": i}, f"r.jsonl:{i + 1}") for i in range(3)]
    records = {"plain": plain, "big": [*plain, Record({"table": (1.0, big)}, {"y": 0}, "r.jsonl:4")]}
    for name, recs in records.items():
        entry = write_split(tmp_path / name, "train", [record_item(r, {}, {}) for r in recs])
        split = split_of(tmp_path / name, "train", entry)
        assert split.fast_json is (name == "plain")
        items = list(StreamingDataset(split.path))
        got = [raw[0]["table"] for raw in decode_records(items, split.fast_json)]
        assert got == [r.inputs["table"] for r in recs]
        assert [type(c) for c in got[-1]] == [type(c) for c in recs[-1].inputs["table"]]
