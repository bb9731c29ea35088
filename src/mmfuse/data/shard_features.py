"""Features of frozen encoders over a shard set: each distinct input encoded once for the whole set, stored inside
the set, read back by every rank by row with bounded memory.

One folder per cached modality, named by the modality and the encoder's key (`cache.encoder_key`: the encoder's
`cache_key()`, i.e. name, weights and preprocessing, plus whether token features are kept), so features of another
encoder or other weights are never read:

```
DIR/features/<modality>-<encoder key>/
    index.json               the root of trust: the encoder's cache_key, the shard set's records (digest of the
                             manifest's files), and the size + sha256 of every file below
    rows/<split>.npy         (N_split,) int64: the feature row of each record of the split (memory-mapped)
    first.npy                (D, 2) int64: where each of the D distinct inputs first appears (split number, position)
    unit_00000.safetensors   feature rows [0, K): `pooled` (n, D_feat) [+ `tokens` (sum T, D_feat), `offsets` (n + 1,)]
    .lock
```

Building (`ShardFeatures.build`) happens under the folder's lock (`filelock`): the first process to take it does the
work, any other (a DDP rank, a second node on the same file system) waits and then finds it done.

1. plan: every split is read in order; each record's input is hashed by its encoder (`Encoder.content_hash`, once
   per distinct reference) and given the row of its content (a new content, a new row). Writes rows/ and first.npy.
2. encode: the distinct inputs in units of K rows (`encode_rows`, the in-memory cache's code), each unit written
   atomically and then entered in index.json with its sha256. A process killed mid-way loses at most the unit it
   was encoding: the next one re-checks what is listed and encodes only the rest.

Checks, the in-memory cache's policy (`mmfuse.data.cache`): every file is checked (size, sha256, once per process)
before it is read; a missing, truncated or altered unit is named in a warning and encoded again, a damaged row map is
rebuilt (the records read again), an unusable index.json starts the folder over. When the folder cannot be written
(a read-only shard set) the problem is one line (`CacheError`) naming the file.

Memory: reading needs no per-record Python object (rows and features are memory-mapped). The plan keeps one entry
per distinct reference while it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmfuse.data.cache import CacheError, FeatureTable, encode_rows, encoder_key
from mmfuse.data.shards import item_record
from mmfuse.encoders.base import Encoder
from mmfuse.io import atomic_path, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

FORMAT = "mmfuse-shard-features/1"
FEATURES = "features"
UNIT_ROWS = 4096  # distinct inputs per unit (the unit of resumption); stored in index.json
ENCODE_BATCH = 32  # as `FeatureCache.build`
_TEMPORARY = re.compile(r"\..*\.\d+\.[0-9a-f]{8}\.tmp")  # `mmfuse.io.atomic_path`'s temporary files
_IDENTITY = {
    "format": "mmfuse version",
    "modality": "input",
    "cache_key": "encoder (its cache_key differs)",
    "tokens": "fusion (token features kept or not)",
    "records": "shard set (its records differ from the manifest's)",
}
# Files checked by this process: path -> (size, mtime_ns, sha256). A file is hashed once per process.
_CHECKED: dict[str, tuple[int, int, str]] = {}


def records_digest(manifest: Mapping[str, Any]) -> str:
    """What ties features to the records: the manifest's splits (record counts, every file's sha256)."""
    return hashlib.sha256(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()


def _unit_name(unit: int) -> str:
    return f"unit_{unit:05d}.safetensors"


class RowMap:
    """The feature row of each record of a split: `rows[idx]`, idx (B,) long positions -> (B,) long rows.

    The `.npy` file is memory-mapped on first use in each process (a loader worker included); pickles as its path.
    """

    def __init__(self, path: str | Path) -> None:
        self.path, self._rows = str(path), None

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            self._rows = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.asarray(self._rows[idx.numpy()], dtype=np.int64))

    def __len__(self) -> int:
        return int(np.load(self.path, mmap_mode="r").shape[0]) if self._rows is None else len(self._rows)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_rows": None}


class UnitTable(FeatureTable):
    """The features of a shard set's distinct inputs: row r is row r % K of unit r // K.

    Units are memory-mapped (safetensors) on first use in each process; pickles as the file names.
    """

    def __init__(self, paths: list[str], unit_rows: int, n: int, tokens: bool) -> None:
        self.paths, self.unit_rows, self.n, self.has_tokens = paths, unit_rows, n, tokens
        self._units: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.n

    def locate(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.stack((rows // self.unit_rows, rows % self.unit_rows), 1)  # (B, 2)

    def shard(self, shard_no: int) -> dict[str, torch.Tensor]:
        if shard_no not in self._units:
            self._units[shard_no] = load_file(self.paths[shard_no])  # memory-mapped: rows are read when gathered
        return self._units[shard_no]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_units": {}}


class ShardFeatures:
    """The features of one frozen encoder over a shard set (see the module's docstring).

    Args:
        folder: the shard set (`mmfuse pack --out`); manifest: its checked manifest.
        modality: the input's name; encoder: its frozen encoder (eval mode is set while encoding).
        tokens: keep token features too (for fusions that read tokens).
    """

    def __init__(
        self, folder: str | Path, manifest: Mapping[str, Any], modality: str, encoder: Encoder, tokens: bool
    ) -> None:
        self.root, self.manifest, self.modality, self.encoder, self.tokens = (
            Path(folder), manifest, modality, encoder, tokens
        )  # fmt: skip
        self.dir = self.root / FEATURES / f"{modality}-{encoder_key(encoder, tokens)}"
        self.splits = sorted(manifest["splits"])
        self.identity = {
            "format": FORMAT,
            "modality": modality,
            "cache_key": encoder.cache_key(),
            "tokens": tokens,
            "records": records_digest(manifest),
        }
        self.index: dict[str, Any] = {}
        self.encoded = 0  # distinct inputs this object encoded

    # ------------------------------------------------------------------ the whole step
    def build(self, batch_size: int = ENCODE_BATCH) -> tuple[UnitTable, dict[str, RowMap]]:
        """Encode what is missing or damaged (once, under the folder's lock), then open the features for reading.

        Returns:
            (the table of distinct inputs, {split: the row of each record}).
        """
        problem = self.problem()
        if problem is not None:
            with self._lock(problem):
                self._complete(batch_size)
            problem = self.problem()
            if problem is not None:
                raise CacheError(f"{problem} right after being written; check the disk")
        plan = self.index["plan"]
        paths = [str(self.dir / _unit_name(u)) for u in range(self._units())]
        table = UnitTable(paths, plan["unit_rows"], plan["distinct"], self.tokens)
        return table, {s: RowMap(self.dir / "rows" / f"{s}.npy") for s in self.splits}

    def problem(self) -> str | None:
        """None when every file is there and intact; else the first thing to do, naming its file."""
        index, reason = self._read_index()
        if index is None:
            return reason or f"{self.dir}: no features yet"
        self.index = index
        if index["plan"] is None:
            return f"{self.dir}: the records are not yet read"
        for rel, want in index["plan"]["files"].items():
            if (problem := self._file_problem(rel, want)) is not None:
                return f"{self.dir / rel}: {problem}"
        for u in range(self._units()):
            want = index["units"].get(str(u))
            if want is None:
                return f"{self.dir}: {len(index['units'])} of {self._units()} feature units written"
            if (problem := self._file_problem(_unit_name(u), want)) is not None:
                return f"{self.dir / _unit_name(u)}: {problem}"
        return None

    @contextlib.contextmanager
    def _lock(self, problem: str) -> Iterator[None]:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(self.dir / ".lock")
            lock.acquire()
        except OSError as err:
            raise CacheError(
                f"{problem}, and the features of {self.modality} cannot be written there ({err.strerror or err}); "
                "encode them where the shard set is writable: mmfuse pack CONFIG --out DIR --features"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _complete(self, batch_size: int) -> None:
        """Under the lock: plan if needed, then encode the units that are not there (or fail their checks)."""
        for folder in (self.dir, self.dir / "rows"):  # what a killed writer left; no other writer holds the lock
            for entry in os.scandir(folder) if folder.is_dir() else ():
                if _TEMPORARY.fullmatch(entry.name):
                    Path(entry.path).unlink(missing_ok=True)
        index, reason = self._read_index()
        if index is None:
            if reason is not None:
                log.warning("%s; computing the features of %s again", reason, self.modality)
            index = {**self.identity, "plan": None, "units": {}}
        self.index = index
        self._ensure_plan()
        todo = []
        for u in range(self._units()):
            want = index["units"].get(str(u))
            problem = "not written" if want is None else self._file_problem(_unit_name(u), want)
            if want is not None and problem is not None:
                log.warning("%s: %s; encoding its %d inputs again", self.dir / _unit_name(u), problem, want["items"])
                del index["units"][str(u)]
            if problem is not None:
                todo.append(u)
        if todo:
            log.info(
                "features of %s: encoding %d of %d units (%d distinct inputs) into %s",
                self.modality, len(todo), self._units(), index["plan"]["distinct"], self.dir,
            )  # fmt: skip
        sources = _Splits(self.root, self.splits)
        for u in todo:
            self._encode_unit(u, sources, batch_size)

    def _units(self) -> int:
        plan = self.index["plan"]
        return -(-plan["distinct"] // plan["unit_rows"])

    # ------------------------------------------------------------------ index and file checks
    def _read_index(self) -> tuple[dict[str, Any] | None, str | None]:
        """(index.json, None); (None, None) when there is none; (None, why) when it is unusable or another's."""
        path = self.dir / "index.json"
        if not path.is_file():
            return None, None
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            _check_index(index)
        except (OSError, ValueError, RecursionError) as err:
            return None, f"{path}: unusable ({str(err).splitlines()[0][:120]})"
        for key, value in self.identity.items():
            if index.get(key) != value:
                return None, f"{path}: written for another {_IDENTITY[key]}"
        return index, None

    def _write_index(self) -> None:
        atomic_write_text(self.dir / "index.json", json.dumps(self.index, indent=1, sort_keys=True))

    def _file_problem(self, rel: str, want: Mapping[str, Any]) -> str | None:
        path = self.dir / rel
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return "missing (index.json lists it)"
        if st.st_size != want.get("bytes"):
            return f"truncated or grown ({st.st_size} bytes, index.json says {want.get('bytes')})"
        seen = (st.st_size, st.st_mtime_ns, str(want.get("sha256")))
        if _CHECKED.get(str(path)) != seen:
            if sha256_file(path) != want.get("sha256"):
                return "damaged (its sha256 differs from index.json's)"
            _CHECKED[str(path)] = seen
        return None

    def _entry(self, path: Path) -> dict[str, Any]:
        """The index entry of a file this process just wrote (and its check, remembered)."""
        st, digest = path.stat(), sha256_file(path)
        _CHECKED[str(path)] = (st.st_size, st.st_mtime_ns, digest)
        return {"bytes": st.st_size, "sha256": digest}

    # ------------------------------------------------------------------ 1. plan: the row of every record
    def _ensure_plan(self) -> None:
        plan = self.index["plan"]
        problems = [] if plan is None else [(r, self._file_problem(r, w)) for r, w in plan["files"].items()]
        problems = [(r, p) for r, p in problems if p is not None]
        if plan is not None and not problems:
            return
        for rel, problem in problems:
            log.warning("%s: %s; reading the records again", self.dir / rel, problem)
        new = self._plan()
        if new != plan:
            self.index["units"] = {}  # the rows changed: no unit is known to hold them
        self.index["plan"] = new
        self._write_index()

    def _plan(self) -> dict[str, Any]:
        """Read every split in order; write each record's feature row and each distinct input's first place."""
        (self.dir / "rows").mkdir(exist_ok=True)
        row_of_ref: dict[Hashable, int] = {}  # each distinct reference hashed once
        row_of_hash: dict[str, int] = {}
        first: list[tuple[int, int]] = []
        files = {}
        sources = _Splits(self.root, self.splits)
        with tempfile.TemporaryDirectory(prefix="mmfuse-plan-") as tmp:
            for s_no, split in enumerate(self.splits):
                n, rel = int(self.manifest["splits"][split]["records"]), f"rows/{split}.npy"
                with atomic_path(self.dir / rel) as part:
                    rows = np.lib.format.open_memmap(part, mode="w+", dtype=np.int64, shape=(n,))
                    for i in range(n):
                        ref, data = self._input(sources, s_no, i)
                        row = row_of_ref.get(ref)
                        if row is None:
                            digest = self.encoder.content_hash(_where(ref, data, tmp, "input"))
                            row = row_of_ref[ref] = row_of_hash.setdefault(digest, len(first))
                            if row == len(first):
                                first.append((s_no, i))
                        rows[i] = row
                    rows.flush()
                    del rows
                files[rel] = self._entry(self.dir / rel)
        with atomic_path(self.dir / "first.npy") as part, open(part, "wb") as f:
            np.save(f, np.asarray(first, dtype=np.int64).reshape(-1, 2))
        files["first.npy"] = self._entry(self.dir / "first.npy")
        log.info("features of %s: %d distinct inputs in %d records", self.modality, len(first), sum(
            int(v["records"]) for v in self.manifest["splits"].values()
        ))  # fmt: skip
        return {"distinct": len(first), "unit_rows": UNIT_ROWS, "files": files}

    def _input(self, sources: dict[int, Any], s_no: int, pos: int) -> tuple[Hashable, bytes | None]:
        """(the record's reference to this input, its embedded bytes or None). CacheError when it has none."""
        record, files = item_record(sources[s_no][pos], self.splits[s_no])
        ref = record.inputs.get(self.modality)
        if ref is None:
            raise CacheError(
                f"{record.source}: no {self.modality}; features are cached per input, so every record needs one "
                "(set train.cache=false to train on such records)"
            )
        return ref, files.get(self.modality)

    # ------------------------------------------------------------------ 2. encode, one unit at a time
    def _encode_unit(self, unit: int, sources: dict[int, Any], batch_size: int) -> None:
        plan = self.index["plan"]
        k = plan["unit_rows"]
        first = np.load(self.dir / "first.npy", mmap_mode="r")
        rows = list(range(unit * k, min(plan["distinct"], (unit + 1) * k)))
        was_training = self.encoder.training
        self.encoder.eval()
        with tempfile.TemporaryDirectory(prefix="mmfuse-unit-") as tmp:

            def load(row: object) -> object:
                s_no, pos = (int(v) for v in first[int(row)])  # type: ignore[call-overload]
                ref, data = self._input(sources, s_no, pos)
                return self.encoder.load(_where(ref, data, tmp, str(row)))

            try:
                tensors = encode_rows(self.encoder, rows, load, batch_size, self.tokens, self.modality)
            finally:
                self.encoder.train(was_training)
        path = self.dir / _unit_name(unit)
        with atomic_path(path) as part:  # a reader never sees half a unit
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(part), metadata={"rows": f"{rows[0]}"})
        self.index["units"][str(unit)] = {**self._entry(path), "items": len(rows)}
        self._write_index()  # after the unit: a kill in between costs that unit only
        self.encoded += len(rows)


def _check_index(index: object) -> None:
    """ValueError when an index.json's structure is not what this module writes."""

    def entry(e: object, *keys: str) -> bool:
        return (
            isinstance(e, dict)
            and isinstance(e.get("sha256"), str)
            and all(type(e.get(k)) is int and e[k] >= 0 for k in ("bytes", *keys))
        )

    plan = index.get("plan", ...) if isinstance(index, dict) else ...
    units = index.get("units") if isinstance(index, dict) else None
    ok = isinstance(units, dict) and all(entry(u, "items") for u in units.values())
    if plan is not None:
        ok = ok and isinstance(plan, dict) and type(plan.get("distinct")) is int and plan["distinct"] >= 0
        ok = ok and type(plan.get("unit_rows")) is int and plan["unit_rows"] > 0 and isinstance(plan.get("files"), dict)
        ok = ok and all(entry(f) for f in plan["files"].values())
    if not ok:
        raise ValueError("not a feature index of this mmfuse version")


class _Splits(dict):
    """{split number: the split's LitData dataset, read by position}, each opened on first use."""

    def __init__(self, root: Path, names: list[str]) -> None:
        super().__init__()
        self.root, self.names = root, names

    def __missing__(self, s_no: int) -> Any:
        from litdata import StreamingDataset

        opened = self[s_no] = StreamingDataset(str(self.root / self.names[s_no]), shuffle=False)
        return opened


def _where(ref: Hashable, data: bytes | None, folder: str, name: str) -> Hashable:
    """The reference an encoder reads: `ref` itself, or its embedded bytes written to a file in `folder`."""
    if data is None:
        return ref
    path = Path(folder) / f"{name}{Path(str(ref)).suffix.lower()}"
    path.write_bytes(data)
    return str(path)
