"""Streaming shards: the records of each split in LitData chunks, read with bounded memory.

A shard set is a folder written by `mmfuse pack`:

```
DIR/mmfuse_manifest.json     the config's inputs and tasks, learned options, per split its records and files
DIR/<split>/index.json       LitData's index of the split's chunks
DIR/<split>/chunk-*.bin      LitData chunks: one item per record
```

An item is `{"index": position in the split, "record": JSON of the record, "file:<modality>": the input file's
bytes (b"" when not embedded)}`. The chunk format is LitData's (`BinaryWriter`, `StreamingDataset`); this module
adds the manifest and its check (size and sha256 of every file, before anything is read), and turns items into the
samples `Collator` batches. Training streams a split (`ShardStream`: LitData partitions its chunks over ranks and
loader workers and shuffles them by seed and epoch); evaluation reads it in order by position (`ShardRows`), so the
DDP evaluation sharding (`train.sharding`) counts every record once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mmfuse.data.dataset import encode_labels
from mmfuse.data.records import DataError, Record
from mmfuse.encoders.base import Encoder
from mmfuse.tasks import Task

MANIFEST = "mmfuse_manifest.json"
FORMAT = 1
FILE_KEY = "file:"


class ShardError(DataError):
    """A shard set that cannot be used: one line naming the file and what is wrong."""


# ---------------------------------------------------------------------- records <-> items
def _hashable(value: Any) -> Any:
    """JSON lists back into tuples (references must be hashable)."""
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def record_item(index: int, record: Record, files: Mapping[str, bytes]) -> dict[str, Any]:
    """One record as a shard item; `files` holds {modality: bytes} for the embedded modalities (b"" when missing)."""
    text = json.dumps(
        {"inputs": record.inputs, "labels": record.labels, "source": record.source, "group": record.group},
        separators=(",", ":"),
    )
    return {"index": index, "record": text, **{FILE_KEY + m: files[m] for m in sorted(files)}}


def item_record(item: Mapping[str, Any], split: str) -> tuple[Record, dict[str, bytes]]:
    """A shard item -> (the Record, {modality: embedded file bytes} for non-empty ones)."""
    raw = json.loads(item["record"])
    inputs = {m: _hashable(v) for m, v in raw["inputs"].items()}
    record = Record(inputs, raw["labels"], raw["source"], split, raw.get("group"))
    files = {k[len(FILE_KEY) :]: bytes(v) for k, v in item.items() if k.startswith(FILE_KEY) and len(v)}
    return record, files


def local_copy(data: bytes, name: str, folder: Path) -> str:
    """An embedded file written once (by content) under `folder`, keeping the original name's suffix."""
    digest = hashlib.sha256(data).hexdigest()
    path = folder / f"{digest}{Path(name).suffix.lower()}"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def files_folder() -> Path:
    """Where embedded input files are written for their encoders to read (MMFUSE_SHARD_FILES, else the temp dir)."""
    return Path(os.environ.get("MMFUSE_SHARD_FILES") or Path(tempfile.gettempdir()) / "mmfuse-shard-files")


def require_litdata() -> None:
    """ShardError (one line) when LitData, which writes and reads the shards, is not installed."""
    try:
        import litdata  # noqa: F401
    except ImportError:
        raise ShardError("shards need LitData: pip install 'mmfuse[stream]' (or litdata)") from None


# ---------------------------------------------------------------------- writing
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_split(
    folder: Path, split: str, items: Sequence[dict[str, Any]] | Any, chunk_bytes: str = "64MB"
) -> dict[str, Any]:
    """Write one split's items with LitData's `BinaryWriter` into `folder/split`.

    Returns:
        {"records": N, "files": {relative path: {"bytes": size, "sha256": hex}}} for the manifest.
    """
    require_litdata()
    from litdata.streaming.writer import BinaryWriter

    out = folder / split
    out.mkdir(parents=True, exist_ok=False)
    writer = BinaryWriter(str(out), chunk_bytes=chunk_bytes)
    n = 0
    for item in items:
        writer.add_item(n, item)
        n += 1
    writer.done()
    writer.merge()
    files = {}
    for p in sorted(out.iterdir()):
        files[f"{split}/{p.name}"] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    return {"records": n, "files": files}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, **manifest}, indent=2, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


# ---------------------------------------------------------------------- reading and checking
def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a shard set. ShardError when `folder` is not one (missing, no manifest, unreadable)."""
    require_litdata()
    root = Path(folder)
    if not root.is_dir():
        raise ShardError(
            f"{root}: not a shard folder (no such directory); write one with `mmfuse pack CONFIG --out DIR`"
        )
    path = root / MANIFEST
    if not path.is_file():
        raise ShardError(f"{root}: not a shard set (no {MANIFEST}); write one with `mmfuse pack CONFIG --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: not a readable manifest ({str(err).splitlines()[0][:120]})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("splits"), dict)
    ):
        raise ShardError(f"{path}: not an mmfuse shard manifest of format {FORMAT}")
    return manifest


def verify_shards(folder: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Every file the manifest lists exists with its size and sha256 (a missing, truncated or altered shard).

    Raises:
        ShardError: "DIR/split/chunk-0-0.bin: what is wrong" for the first bad file.
    """
    root = Path(folder)
    for split in manifest["splits"].values():
        for rel, want in split["files"].items():
            path = root / rel
            if not path.is_file():
                raise ShardError(f"{path}: shard missing (the manifest lists it); pack the data again")
            size = path.stat().st_size
            if size != want["bytes"]:
                raise ShardError(f"{path}: shard truncated or grown ({size} bytes, the manifest says {want['bytes']})")
            if file_sha256(path) != want["sha256"]:
                raise ShardError(f"{path}: shard damaged (its sha256 differs from the manifest's); pack the data again")


@dataclass(frozen=True)
class ShardSplit:
    """One split of a checked shard set: what a run holds instead of a list of records."""

    folder: str
    split: str
    n: int

    @property
    def path(self) -> str:
        return str(Path(self.folder) / self.split)

    def __len__(self) -> int:
        return self.n


class ShardSamples:
    """Shard items -> the samples of `MultiModalDataset` (`index`, `inputs`, `refs`, `labels`); pickles plainly.

    Args:
        encoders: {modality: encoder} of the inputs to load and preprocess.
        tasks: {task: Task}, which encode the labels.
        split: the split's name (for the records' `split`).
        train: preprocessing in training mode (augmentation).
    """

    def __init__(self, encoders: Mapping[str, Encoder], tasks: Mapping[str, Task], split: str, train: bool) -> None:
        self.encoders, self.tasks, self.split, self.train = dict(encoders), dict(tasks), split, train

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        record, files = item_record(item, self.split)
        inputs: dict[str, Any] = {}
        refs: dict[str, Hashable] = {}
        for m, enc in self.encoders.items():
            ref = refs[m] = record.inputs.get(m)
            if ref is None:
                inputs[m] = None
                continue
            where = local_copy(files[m], str(ref), files_folder()) if m in files else ref
            inputs[m] = enc.preprocess(enc.load(where), train=self.train)
        return {
            "index": int(item["index"]),
            "inputs": inputs,
            "refs": refs,
            "labels": encode_labels(record, self.tasks),
        }


def open_stream(split: ShardSplit, samples: ShardSamples, shuffle: bool, seed: int) -> Any:
    """The split as a LitData `StreamingDataset` whose items are samples (see `ShardStream`)."""
    from mmfuse.data.shard_stream import ShardStream

    return ShardStream(split.path, samples, shuffle=shuffle, seed=seed)


class ShardRows(Dataset):
    """A split read by position (`dataset[i]`, in any order): evaluation and DDP evaluation sharding."""

    def __init__(self, split: ShardSplit, samples: ShardSamples) -> None:
        self.split, self.samples, self.stream = split, samples, None

    def __len__(self) -> int:
        return self.split.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.stream is None:  # opened lazily: in each loader worker after the fork
            from litdata import StreamingDataset

            self.stream = StreamingDataset(self.split.path, shuffle=False)
        return self.samples(self.stream[int(i)])
