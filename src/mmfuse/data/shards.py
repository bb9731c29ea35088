"""Streaming shards: the records of each split in LitData chunks, read with bounded memory.

A shard set is a folder written by `mmfuse pack`:

```
DIR/mmfuse_manifest.json     the config's inputs and tasks, learned options, per split its records and files
DIR/<split>/index.json       LitData's index of the split's chunks
DIR/<split>/chunk-*.bin      LitData chunks: one item per record
```

An item (format 3) is `{"record": JSON of [inputs, labels, source, group], "num": float64 (n,) array,
"file:<modality>": the input file's bytes (b"" when not embedded)}`: a reference that is a tuple of floats (an
embedding) is stored in the typed `num` column (its place in the JSON inputs holds `{"f": length}`; references are
hashable, so never a JSON object), the rest stays JSON; a split without any such reference has no `num` column. The
labels are stored encoded (`{task: task.encode(label) or null}`: a class index, a 0/1, a multi-hot list, a float), so
a run reads them as the in-memory path holds them, encoding nothing; the manifest keeps each task's kind and classes
they were encoded with (`label_encoding`), and a run whose tasks encode otherwise is refused. Formats 1 and 2 kept
the raw labels (format 1 also every number in the JSON); a set packed in either is refused with one line.

The chunk format is LitData's (`BinaryWriter`, `StreamingDataset`); this module adds the manifest and its check (size
and sha256 of every file, before anything is read), and turns items into the samples `Collator` batches, a batch of
items at a time (`ShardSamples.batch`: one JSON parse and one `tolist` of the vectors a batch). Training streams a
split (`ShardStream`: LitData partitions its chunks over ranks and loader workers and shuffles them by seed and
epoch); evaluation reads it in order by position (`ShardRows`), so the DDP evaluation sharding (`train.sharding`)
counts every record once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from mmfuse.data.dataset import encode_labels
from mmfuse.data.records import DataError, Record
from mmfuse.encoders.base import Encoder
from mmfuse.tasks import Task

MANIFEST = "mmfuse_manifest.json"
FORMAT = 3  # 3: labels stored encoded; 2: float vectors in the typed `num` column; 1: the whole record as JSON
FILE_KEY = "file:"
NUM_KEY = "num"
VECTOR = "f"  # {"f": n} in a record's JSON inputs: the reference is the next n floats of the item's `num` column
NESTED = "t"  # {"t": [...]} in a record's JSON inputs: a reference of nested tuples (a plain list: a flat tuple)
# LitData reads local chunk files in place through mmap, keeping up to 4 of each reader's chunks mapped; their pages
# count in the reader's RSS. 16 MB chunks bound that to ~64 MB a reader: with 64 MB chunks the peak RSS of a streamed
# epoch grew 1.22x from 10^5 to 10^6 records (docs/scale.md).
DEFAULT_CHUNK_BYTES = "16MB"
try:
    from orjson import loads as _orjson_loads
except ImportError:  # the `stream` extra brings it; without it the standard parser reads the same records
    _orjson_loads = None
# A run of 19 or more digits in a record's JSON may be an integer beyond 64 bits; a split without one is read by orjson.
_LONG_DIGITS = re.compile(r"[0-9]{19}")
INTS_64 = "ints_within_64_bits"
_UNITS = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


class ShardError(DataError):
    """A shard set that cannot be used: one line naming the file and what is wrong."""


# ---------------------------------------------------------------------- records <-> items
def _hashable(value: Any) -> Any:
    """JSON lists back into tuples, at every depth (references must be hashable)."""
    return tuple(_hashable(v) for v in value) if type(value) is list else value


def _is_vector(ref: Any) -> bool:
    return type(ref) is tuple and len(ref) > 0 and all(type(x) is float for x in ref)


def has_vectors(records: Sequence[Record]) -> bool:
    """Whether any record holds a float vector reference: the split's items then carry the `num` column."""
    return any(_is_vector(ref) for r in records for ref in r.inputs.values())


def label_encoding(tasks: Mapping[str, Task]) -> dict[str, dict[str, Any]]:
    """{task: {"kind", "classes"}}: what a task's `encode` depends on, kept in the manifest with the encoded labels."""
    return {name: {"kind": t.kind, "classes": t.classes} for name, t in tasks.items()}


def record_item(
    record: Record, files: Mapping[str, bytes], tasks: Mapping[str, Task], vectors: bool = True
) -> dict[str, Any]:
    """One record as a shard item; `files` holds {modality: bytes} for the embedded modalities (b"" when missing).

    Args:
        tasks: {task: Task} whose labels the item stores, encoded (labels of other names are left out).
        vectors: the item carries the `num` column (every item of a split must, or none: LitData fixes an item's
            fields at the first one); without it a float vector stays in the JSON.

    Raises:
        DataError: "SOURCE: task 'x': ..." for a label a task rejects.
    """
    inputs, nums = {}, []
    for m, ref in record.inputs.items():
        if vectors and _is_vector(ref):  # float64 holds a Python float exactly
            inputs[m] = {VECTOR: len(ref)}
            nums.extend(ref)
        elif type(ref) is tuple and any(type(x) is tuple for x in ref):
            inputs[m] = {NESTED: ref}
        else:
            inputs[m] = ref
    labels = encode_labels(record, tasks)
    text = json.dumps([inputs, labels, record.source, record.group], separators=(",", ":"))
    item: dict[str, Any] = {"record": text}
    if vectors:
        item[NUM_KEY] = np.asarray(nums, dtype=np.float64)
    return {**item, **{FILE_KEY + m: files[m] for m in sorted(files)}}


def json_ints_fit(text: str) -> bool:
    """Whether every integer in this JSON text fits in 64 bits (no run of 19 or more digits): orjson reads it then as
    `json.loads` does."""
    return _LONG_DIGITS.search(text) is None


def parse_json(text: str, fast: bool = False) -> Any:
    """`json.loads`; with `fast`, by orjson when it is installed (0.5 against 1.7 us a streamed record). `fast` is for
    text whose integers all fit in 64 bits (orjson reads a larger one as a float): `pack` notes that of each split.
    The standard parser still reads what orjson refuses (NaN and Infinity, which `json.dumps` writes)."""
    if fast and _orjson_loads is not None:
        try:
            return _orjson_loads(text)
        except ValueError:
            pass
    return json.loads(text)


def decode_records(items: Sequence[Mapping[str, Any]], fast_json: bool = False) -> list[list[Any]]:
    """Shard items -> their records as [inputs {modality: reference}, labels {task: encoded}, source, group]: one
    JSON parse (`parse_json`) and one `tolist` of the `num` columns for all of them (an item's vectors follow the
    previous item's)."""
    raws = parse_json("[" + ",".join([item["record"] for item in items]) + "]", fast_json)
    nums, at = None, 0
    for raw in raws:
        inputs = raw[0]
        for m, ref in inputs.items():
            kind = type(ref)
            if kind is list:
                inputs[m] = tuple(ref)
            elif kind is dict:
                if NESTED in ref:
                    inputs[m] = _hashable(ref[NESTED])
                    continue
                if nums is None:
                    nums = np.concatenate([item[NUM_KEY] for item in items]).tolist()
                n = ref[VECTOR]
                inputs[m], at = tuple(nums[at : at + n]), at + n
    return raws


def item_files(item: Mapping[str, Any]) -> dict[str, bytes]:
    """{modality: embedded file bytes} of an item's non-empty files."""
    return {k[len(FILE_KEY) :]: bytes(v) for k, v in item.items() if k.startswith(FILE_KEY) and len(v)}


def item_record(item: Mapping[str, Any], split: str) -> tuple[Record, dict[str, bytes]]:
    """A shard item -> (the Record, {modality: embedded file bytes} for non-empty ones). The Record's labels are the
    encoded ones the item stores ({task: encoded or None}), not the raw labels that were packed."""
    inputs, labels, source, group = decode_records([item])[0]
    return Record(inputs, labels, source, split, group), item_files(item)


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


def chunk_bytes_of(size: str | int) -> int:
    """A chunk size ("16MB", "600B", 2**24) in bytes; DataError (one line) for anything but a positive size."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmg]b?|[kmg]ib|b)\s*", str(size).lower())
        n = int(float(m.group(1)) * _UNITS[m.group(2).removesuffix("b") or "b"]) if m else 0
    if n < 1:
        raise DataError(f"chunk size {size!r}: not a positive size (a number and B, kB, MB or GB, e.g. 16MB)")
    return n


def write_split(
    folder: Path, split: str, items: Sequence[dict[str, Any]] | Any, chunk_bytes: str | int = DEFAULT_CHUNK_BYTES
) -> dict[str, Any]:
    """Write one split's items with LitData's `BinaryWriter` into `folder/split`.

    Returns:
        {"records": N, "files": {relative path: {"bytes": size, "sha256": hex}}, INTS_64: whether every integer in
        the records' JSON fits in 64 bits (`parse_json` may then take orjson)} for the manifest.
    """
    require_litdata()
    from litdata.streaming.writer import BinaryWriter

    out = folder / split
    out.mkdir(parents=True, exist_ok=False)
    writer = BinaryWriter(str(out), chunk_bytes=chunk_bytes_of(chunk_bytes))
    n, long_digits = 0, False
    for item in items:
        long_digits = long_digits or not json_ints_fit(item["record"])
        writer.add_item(n, item)
        n += 1
    writer.done()
    writer.merge()
    files = {}
    for p in sorted(out.iterdir()):
        files[f"{split}/{p.name}"] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    return {"records": n, "files": files, INTS_64: not long_digits}


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
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ShardError(f"{path}: not an mmfuse shard manifest of format {FORMAT}")
    old = manifest.get("format")
    if isinstance(old, int) and not isinstance(old, bool) and 1 <= old < FORMAT:
        raise ShardError(
            f"{path}: packed in shard format {old}, this mmfuse reads format {FORMAT}; pack the data again: "
            "mmfuse pack CONFIG --out NEW_DIR"
        )
    if old != FORMAT:
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
    fast_json: bool = False  # the manifest's INTS_64 of the split: `parse_json(..., fast=True)` reads its records

    @property
    def path(self) -> str:
        return str(Path(self.folder) / self.split)

    def __len__(self) -> int:
        return self.n


def split_of(folder: str | os.PathLike[str], split: str, entry: Mapping[str, Any]) -> ShardSplit:
    """The ShardSplit of a manifest's `splits[split]` entry (its record count and whether orjson may read it)."""
    return ShardSplit(str(folder), split, int(entry["records"]), entry.get(INTS_64) is True)


class ShardSamples:
    """Shard items -> the samples of `MultiModalDataset` (`index`, `inputs`, `refs`, `labels`); pickles plainly.

    Args:
        encoders: {modality: encoder} of the inputs to load and preprocess.
        tasks: {task: Task} of the run, whose labels the items hold encoded (`shard_run_data` checked their kinds
            and classes against the manifest; a batch whose items lack one of them is refused).
        split: the split's name (for the records' `split`).
        train: preprocessing in training mode (augmentation).
        fast_json: the split's records may be parsed by orjson (`ShardSplit.fast_json`).
    """

    def __init__(
        self,
        encoders: Mapping[str, Encoder],
        tasks: Mapping[str, Task],
        split: str,
        train: bool,
        fast_json: bool = False,
    ) -> None:
        self.encoders, self.tasks, self.split, self.train = dict(encoders), dict(tasks), split, train
        self.fast_json = fast_json

    def __call__(self, index: int, item: Mapping[str, Any]) -> dict[str, Any]:
        return self.batch([(index, item)])[0]

    def batch(self, items: Sequence[tuple[int, Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """[(position in the split, item)] -> samples: one JSON parse for the batch, the labels as stored (encoded
        when packed; the records were validated then, and the shards' checksums checked before the run)."""
        raws = decode_records([item for _, item in items], self.fast_json)
        if raws and not self.tasks.keys() <= raws[0][1].keys():
            raise ShardError(
                f"{self.split}: the shard items hold the labels of tasks {', '.join(raws[0][1]) or 'none'}, this run "
                f"has {', '.join(self.tasks)}; pack the data again with its config"
            )
        encoders = [(m, FILE_KEY + m, enc) for m, enc in self.encoders.items()]
        samples = []
        for (index, item), (given, labels, _, _) in zip(items, raws, strict=True):
            inputs: dict[str, Any] = {}
            refs: dict[str, Hashable] = {}
            for m, key, enc in encoders:
                ref = refs[m] = given.get(m)
                if ref is None:
                    inputs[m] = None
                    continue
                data = item.get(key)
                where = local_copy(bytes(data), str(ref), files_folder()) if data is not None and len(data) else ref
                inputs[m] = enc.preprocess(enc.load(where), train=self.train)
            samples.append({"index": index, "inputs": inputs, "refs": refs, "labels": labels})
        return samples


class BatchSamples:
    """The streamed loader's collate_fn: a batch of `(position, item)` pairs made into samples together
    (`ShardSamples.batch`), then collated by `collate`; plain attributes only, so it pickles into loader workers."""

    def __init__(self, samples: ShardSamples, collate: Any) -> None:
        self.samples, self.collate = samples, collate

    def __call__(self, items: Sequence[tuple[int, Mapping[str, Any]]]) -> Any:
        return self.collate(self.samples.batch(items))


def open_stream(split: ShardSplit, samples: ShardSamples, shuffle: bool, seed: int) -> Any:
    """The split as a LitData `StreamingDataset` whose items are samples (see `ShardStream`)."""
    from mmfuse.data.shard_stream import ShardStream

    return ShardStream(split.path, samples, shuffle=shuffle, seed=seed)


class ShardRows(Dataset):
    """A split read by position (`dataset[i]`, in any order): evaluation and DDP evaluation sharding. The loader's
    batched fetch (`__getitems__`) makes a batch of samples together."""

    def __init__(self, split: ShardSplit, samples: ShardSamples) -> None:
        self.split, self.samples, self.stream = split, samples, None

    def __len__(self) -> int:
        return self.split.n

    def _item(self, i: int) -> Mapping[str, Any]:
        if self.stream is None:  # opened lazily: in each loader worker after the fork
            from litdata import StreamingDataset

            self.stream = StreamingDataset(self.split.path, shuffle=False)
        return self.stream[i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.samples(int(i), self._item(int(i)))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return self.samples.batch([(int(i), self._item(int(i))) for i in indices])
