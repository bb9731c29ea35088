"""Feature cache for frozen encoders.

A frozen encoder's output depends only on its identity (`Encoder.cache_key()`: name, weights
hash, preprocessing) and on the input's content (image file bytes, text). So each distinct input
is encoded once, ever: features are stored on disk in safetensors shards, keyed by both, and
reused by every later epoch and run. A changed image, text, transform or weights file gives a new
key, so nothing stale is served.

Layout: `<cache_dir>/.mmfuse-cache` marks the folder as a cache (written when the cache first
writes there); `<cache_dir>/<encoder key>/index.json` maps an input's content hash to (shard, row)
and holds each shard's sha256; `shard_NNNNN.safetensors` holds `pooled` (N, D) and, when tokens are
kept, `tokens` (sum T_i, D) with `offsets` (N + 1,) (padding is not stored; batches are re-padded
to their longest item).

Safety: a shard is checked against its sha256 the first time a process reads it; a corrupt or
missing shard is dropped and the inputs that need it are encoded again (with a warning), and an
unreadable index is rebuilt the same way. The index's rows are covered too: each shard holds, in its
safetensors header (so under its sha256), the content hash of every row in row order, and the index's
rows of that shard must list exactly those keys at exactly those rows; a shard whose rows were edited
(two rows swapped, a key changed, a row removed or added) is dropped and its inputs encoded again.
`clear_cache` deletes only the files this module writes (by name, never through a symbolic link) and
refuses a folder that is not a cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import torch
from safetensors.torch import load_file, save_file

from mmfuse.data.records import DataError
from mmfuse.encoders.base import Encoder, EncoderOutput
from mmfuse.io import atomic_path, atomic_write_text, sha256_stream, sha256_text
from mmfuse.utils import move_to

log = logging.getLogger(__name__)

SHARD_ITEMS = 4096
INDEX_FORMAT = "mmfuse-feature-cache/3"  # /3: shards hold their row keys
KEYS_META = "mmfuse_row_keys"  # safetensors header metadata: JSON list of the content hash of each row
MARKER = ".mmfuse-cache"
_KEY_DIR = re.compile(r"[0-9a-f]{20}")  # `encoder_key`
# A temporary file is `.<name>.<pid>.<8 hex>.tmp` (`mmfuse.io.atomic_path`); `.<name>.<pid>.tmp` from older versions.
_CACHE_FILE = re.compile(
    r"index\.json|shard_\d{5}\.safetensors|\.lock|\.(index\.json|shard_\d{5}\.safetensors)\.\d+(\.[0-9a-f]{8})?\.tmp"
)
# Shards verified by this process: path -> ((size, mtime_ns, sha256), digest of its row keys or None).
# A shard is hashed once per process.
_VERIFIED: dict[str, tuple[tuple[int, int, str], str | None]] = {}


class CacheError(DataError):
    """A feature-cache problem the user must act on, as one line (the CLI prints it and exits 2)."""


def default_cache_dir() -> Path:
    env = os.environ.get("MMFUSE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mmfuse" / "features"


def encoder_key(encoder: Encoder, tokens: bool) -> str:
    return sha256_text(f"{encoder.cache_key()}|tokens={tokens}")[:20]


class FeatureTable:
    """Features of distinct inputs: row i is one input. Gathers padded batches.

    The shards are memory-mapped safetensors files, so a table larger than memory still works: a
    batch reads only its own rows from disk (through the page cache).

    Args:
        shards: per shard {"pooled": (N_s, D), and "tokens": (sum T, D), "offsets": (N_s + 1,) when kept}.
        loc: (N, 2) long, the (shard, row) of each distinct input.
    """

    def __init__(self, shards: list[dict[str, torch.Tensor]], loc: torch.Tensor) -> None:
        self.shards, self.loc = shards, loc
        self.has_tokens = bool(shards) and "tokens" in shards[0]

    def __len__(self) -> int:
        return self.loc.shape[0]

    def locate(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: (B,) long -> (B, 2) long, the (shard, row in shard) of each."""
        return self.loc[rows]

    def shard(self, shard_no: int) -> dict[str, torch.Tensor]:
        return self.shards[shard_no]

    def gather(self, rows: torch.Tensor) -> EncoderOutput:
        """rows: (B,) long -> EncoderOutput with tokens re-padded to the longest item of the batch."""
        loc = self.locate(rows)  # (B, 2)
        parts = []
        for shard_no in loc[:, 0].unique().tolist():
            sel = (loc[:, 0] == shard_no).nonzero().squeeze(1)
            parts.append((sel, self._from_shard(self.shard(shard_no), loc[sel, 1])))
        if len(parts) == 1:
            return parts[0][1]
        return _merge(parts, len(rows))

    def _from_shard(self, shard: dict[str, torch.Tensor], rows: torch.Tensor) -> EncoderOutput:
        pooled = shard["pooled"][rows]  # (B, D)
        if not self.has_tokens:
            return EncoderOutput(pooled)
        offsets, tokens = shard["offsets"], shard["tokens"]
        starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
        pos = torch.arange(int(lengths.max()))
        mask = pos.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        idx = (starts.unsqueeze(1) + pos.unsqueeze(0)).clamp(max=tokens.shape[0] - 1)
        return EncoderOutput(pooled, tokens[idx] * mask.unsqueeze(-1).to(tokens.dtype), mask)  # (B, T, D)


@torch.inference_mode()
def encode_rows(
    encoder: Encoder,
    refs: Sequence[object],
    load: Callable[[object], object],
    batch_size: int,
    tokens: bool,
    modality: str,
) -> dict[str, torch.Tensor]:
    """Encode `refs` in batches (each loaded by `load` only when its batch comes) into one shard's tensors.

    The caller puts the encoder in eval mode. Padding is not stored: a row's tokens are its real tokens only.

    Returns:
        {"pooled": (N, D)} float32, plus with `tokens` {"tokens": (sum T_i, D), "offsets": (N + 1,)}.
    """
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    pooled, toks, lengths = [], [], []
    for b in range(0, len(refs), batch_size):
        raws = [load(r) for r in refs[b : b + batch_size]]
        out = encoder(move_to(encoder.collate([encoder.preprocess(r) for r in raws]), device))
        pooled.append(out.pooled.float().cpu())
        if tokens:
            if out.tokens is None:
                raise ValueError(f"{modality} encoder gives no tokens but the fusion needs them")
            mask = out.mask if out.mask is not None else torch.ones(out.tokens.shape[:2], dtype=torch.bool)
            for t, m in zip(out.tokens.float().cpu(), mask.cpu()):
                toks.append(t[m])
                lengths.append(int(m.sum()))
    shard = {"pooled": torch.cat(pooled)}
    if tokens:
        shard["tokens"], shard["offsets"] = torch.cat(toks), torch.tensor([0, *lengths]).cumsum(0)
    return shard


def _merge(parts: list[tuple[torch.Tensor, EncoderOutput]], n: int) -> EncoderOutput:
    """Put per-shard pieces of a batch back in batch order, padding tokens to the longest."""
    first = parts[0][1]
    pooled = first.pooled.new_empty(n, first.pooled.shape[1])
    for sel, out in parts:
        pooled[sel] = out.pooled
    if first.tokens is None:
        return EncoderOutput(pooled)
    t_max = max(out.tokens.shape[1] for _, out in parts)
    tokens = first.tokens.new_zeros(n, t_max, first.tokens.shape[2])
    mask = torch.zeros(n, t_max, dtype=torch.bool)
    for sel, out in parts:
        t = out.tokens.shape[1]
        tokens[sel, :t], mask[sel, :t] = out.tokens, out.mask
    return EncoderOutput(pooled, tokens, mask)


class FeatureCache:
    """Disk cache of one frozen encoder's outputs.

    Args:
        encoder: the frozen encoder.
        modality: the modality's name (in messages); inputs are its encoder's references (`Encoder.read`).
        root: cache directory (default `~/.cache/mmfuse/features` or `$MMFUSE_CACHE_DIR`).
        tokens: also keep token features (for fusions that read tokens).
    """

    def __init__(self, encoder: Encoder, modality: str, root: str | Path | None = None, tokens: bool = False):
        self.encoder, self.modality, self.keep_tokens = encoder, modality, tokens
        self.root = Path(root or default_cache_dir())
        self.dir = self.root / encoder_key(encoder, tokens)
        self.index: dict[str, list[int]] = {}  # content hash -> [shard, row]
        self.shards: dict[int, dict[str, object]] = {}  # shard -> {"sha256", "bytes", "items"}
        self._index_warned = False
        self._row_digests: dict[int, str | None] | None = None  # memo of `_index_row_digests`
        self._read_index()

    def _read_index(self) -> None:
        """Load index.json; an unreadable one is dropped with a warning (what it listed is encoded again)."""
        self.index, self.shards, self._row_digests = {}, {}, None
        index_file = self.dir / "index.json"
        if not index_file.is_file():
            return
        try:
            self.index, self.shards = _parse_index(json.loads(index_file.read_text(encoding="utf-8")))
        except (OSError, ValueError, RecursionError) as err:
            if not self._index_warned:  # once, not again when re-read under the lock
                log.warning("feature cache %s: index.json is unusable (%s); encoding its inputs again", self.dir, err)
            self._index_warned = True

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if self.root.exists() and not self.root.is_dir():
            raise CacheError(f"feature cache {self.root}: not a directory (set train.cache_dir or MMFUSE_CACHE_DIR)")
        self.dir.mkdir(parents=True, exist_ok=True)
        _mark(self.root)
        with filelock.FileLock(self.dir / ".lock"):
            yield

    def build(self, raws: Sequence[str], batch_size: int = 32) -> tuple[FeatureTable, torch.Tensor]:
        """Encode what is missing, then return the table of distinct inputs and each raw's row (N,)."""
        hash_of = {r: self.encoder.content_hash(r) for r in dict.fromkeys(raws)}  # each distinct input once
        hashes = [hash_of[r] for r in raws]
        distinct = list(dict.fromkeys(hashes))
        if not self._ready(distinct):
            with self._lock():  # another process (a DDP rank, a second run) may be filling the same cache
                self._read_index()
                self._drop_corrupt(distinct)
                missing = {h: r for h, r in zip(hashes, raws) if h not in self.index}
                if missing:
                    log.info("feature cache %s: encoding %d new %s inputs", self.dir, len(missing), self.modality)
                    self._encode_and_store(list(missing.items()), batch_size)
                if not self._ready(distinct):
                    raise CacheError(
                        f"feature cache {self.dir}: shards fail their checksum right after being written; "
                        f"check the disk, or run `mmfuse cache clear --dir {self.root}`"
                    )
        table = self._load([self.index[h] for h in distinct])
        row_of = {h: i for i, h in enumerate(distinct)}
        return table, torch.tensor([row_of[h] for h in hashes], dtype=torch.long)

    def _ready(self, distinct: Sequence[str]) -> bool:
        """Every input has a row, in a shard that passes its checksum."""
        if any(h not in self.index for h in distinct):
            return False
        return all(self._shard_problem(s) is None for s in {self.index[h][0] for h in distinct})

    def _shard_path(self, shard: int) -> Path:
        return self.dir / f"shard_{shard:05d}.safetensors"

    def _shard_problem(self, shard: int) -> str | None:
        """None when the shard file is the one the index describes (sha256, checked once per process) and the
        index's rows of that shard are the keys the shard holds, in its row order; else what is wrong."""
        meta, path = self.shards[shard], self._shard_path(shard)
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return "missing"
        seen = (st.st_size, st.st_mtime_ns, str(meta["sha256"]))
        verified = _VERIFIED.get(str(path))
        if verified is None or verified[0] != seen:
            digest, keys = _shard_digests(path) if st.st_size == meta["bytes"] else (None, None)
            if digest != meta["sha256"]:
                return "corrupt (its sha256 does not match the index)"
            verified = _VERIFIED[str(path)] = (seen, keys)
        if verified[1] is None or verified[1] != self._index_row_digests().get(shard):
            return "not what index.json says it holds (its rows in index.json were edited)"
        return None

    def _index_row_digests(self) -> dict[int, str | None]:
        """{shard: digest of the keys the index puts at its rows 0..n-1, or None when the rows have gaps}."""
        if self._row_digests is None:
            by_shard: dict[int, list[tuple[int, str]]] = {}
            for h, (shard, row) in self.index.items():
                by_shard.setdefault(shard, []).append((row, h))
            self._row_digests = {}
            for shard, rows in by_shard.items():
                rows.sort()
                whole = [r for r, _ in rows] == list(range(len(rows)))
                self._row_digests[shard] = _keys_digest([h for _, h in rows]) if whole else None
        return self._row_digests

    def _drop_corrupt(self, distinct: Sequence[str]) -> None:
        """Forget (and delete) the shards these inputs need that fail their checks; the caller re-encodes."""
        problems = {s: self._shard_problem(s) for s in {self.index[h][0] for h in distinct if h in self.index}}
        bad = sorted(s for s, problem in problems.items() if problem is not None)
        for shard in bad:
            path = self._shard_path(shard)
            held = [h for h, (s, _) in self.index.items() if s == shard]
            log.warning("feature cache: %s is %s; encoding its %d inputs again", path, problems[shard], len(held))
            for h in held:
                del self.index[h]
            del self.shards[shard]
            path.unlink(missing_ok=True)
        if bad:
            self._write_index()

    def _encode_and_store(self, items: list[tuple[str, str]], batch_size: int) -> None:
        self.encoder.eval()
        shard_no = max(self.shards, default=-1) + 1
        for start in range(0, len(items), SHARD_ITEMS):
            chunk = items[start : start + SHARD_ITEMS]
            raws = [r for _, r in chunk]
            tensors = encode_rows(self.encoder, raws, self._load_raw, batch_size, self.keep_tokens, self.modality)
            self._write_shard(shard_no, tensors, [h for h, _ in chunk])
            shard_no += 1

    def _load_raw(self, raw: str) -> object:
        return self.encoder.load(raw)

    def _write_shard(self, shard_no: int, tensors: dict[str, torch.Tensor], hashes: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._shard_path(shard_no)
        keys = {KEYS_META: json.dumps(hashes)}  # under the shard's sha256: the index's rows are checked against it
        with atomic_path(path) as tmp:  # a reader never sees half a shard
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=keys)
            (digest, keys_digest), size = _shard_digests(tmp), tmp.stat().st_size
        _VERIFIED[str(path)] = ((size, path.stat().st_mtime_ns, digest), keys_digest)
        self.shards[shard_no] = {"sha256": digest, "bytes": size, "items": len(hashes)}
        for row, h in enumerate(hashes):
            self.index[h] = [shard_no, row]
        self._write_index()

    def _write_index(self) -> None:
        self._row_digests = None  # the rows changed
        shards = {str(s): meta for s, meta in sorted(self.shards.items())}
        atomic_write_text(
            self.dir / "index.json", json.dumps({"format": INDEX_FORMAT, "shards": shards, "rows": self.index})
        )

    def _load(self, locations: list[list[int]]) -> FeatureTable:
        used = sorted({shard for shard, _ in locations})
        position = {shard: i for i, shard in enumerate(used)}
        # load_file memory-maps the file: nothing is read until rows are gathered.
        shards = [load_file(str(self._shard_path(shard))) for shard in used]
        loc = torch.tensor([[position[shard], row] for shard, row in locations], dtype=torch.long)
        return FeatureTable(shards, loc.reshape(-1, 2))


def _shard_digests(path: Path) -> tuple[str, str | None]:
    """(sha256 of the file, digest of the row keys in its safetensors header, or None when it has none).

    One read: the header (8-byte little-endian length, then JSON) is parsed on the way through.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = f.read(size) if 0 < size <= 100_000_000 else b""
        h = sha256_stream(f, prefix=head + header)
    try:
        keys = json.loads(json.loads(header)["__metadata__"][KEYS_META])
    except (ValueError, KeyError, TypeError, RecursionError):
        return h.hexdigest(), None
    ok = isinstance(keys, list) and all(isinstance(k, str) for k in keys)
    return h.hexdigest(), _keys_digest(keys) if ok else None


def _keys_digest(keys: Sequence[str]) -> str:
    return sha256_text("\n".join(keys))


def _parse_index(data: object) -> tuple[dict[str, list[int]], dict[int, dict[str, object]]]:
    """Check an index.json's structure; ValueError names what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("format") != INDEX_FORMAT:
        raise ValueError(f"written by another mmfuse version: format {data.get('format')!r:.40}, not {INDEX_FORMAT}")
    raw_shards, rows = data.get("shards"), data.get("rows")
    if not isinstance(raw_shards, dict) or not isinstance(rows, dict):
        raise ValueError("no 'shards' or 'rows' map")
    shards: dict[int, dict[str, object]] = {}
    for key, meta in raw_shards.items():
        ok = isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64
        ok = ok and all(isinstance(meta.get(k), int) and meta[k] >= 0 for k in ("bytes", "items"))
        if not (ok and key.isdigit()):
            raise ValueError(f"shard entry {key!r} is malformed")
        shards[int(key)] = meta
    for h, loc in rows.items():
        ok = isinstance(loc, list) and len(loc) == 2 and all(type(v) is int for v in loc)
        if not ok or loc[0] not in shards or not 0 <= loc[1] < int(shards[loc[0]]["items"]):  # type: ignore[call-overload]
            raise ValueError(f"row entry {h!r} points to no shard row")
    return rows, shards


def _mark(root: Path) -> None:
    """Write the marker that tells `clear_cache` this folder is a feature cache."""
    marker = root / MARKER
    if not marker.exists():  # writers in one process or several race: each has its own temporary file
        atomic_write_text(
            marker, "mmfuse feature cache: `mmfuse cache clear` deletes only the files mmfuse wrote here\n"
        )


@dataclass
class CacheContents:
    """What a cache folder holds: the files the cache wrote, and the entries it did not write (kept)."""

    root: Path
    files: list[Path] = field(default_factory=list)
    key_dirs: list[Path] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(os.stat(p, follow_symlinks=False).st_size for p in self.files)


def scan_cache(root: str | Path | None = None) -> CacheContents:
    """List a cache folder's files without following any symbolic link inside it.

    Raises:
        CacheError: the folder exists but is not an mmfuse feature cache (no marker, no encoder folder).
    """
    root = Path(root or default_cache_dir())
    out = CacheContents(root)
    if not root.exists():
        return out
    if not root.is_dir():
        raise CacheError(f"{root}: not a directory")
    for entry in os.scandir(root):
        if entry.name == MARKER and entry.is_file(follow_symlinks=False):
            out.files.append(Path(entry.path))
        elif _KEY_DIR.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            out.key_dirs.append(Path(entry.path))
            for inner in os.scandir(entry.path):
                if _CACHE_FILE.fullmatch(inner.name) and inner.is_file(follow_symlinks=False):
                    out.files.append(Path(inner.path))
                else:
                    out.foreign.append(f"{entry.name}/{inner.name}")
        else:
            out.foreign.append(entry.name)
    marked = any(p.name == MARKER for p in out.files)
    if not marked and not any((d / "index.json").is_file() for d in out.key_dirs):
        raise CacheError(f"{root} is not an mmfuse feature cache (no {MARKER} marker); nothing done")
    return out


def cache_size(root: str | Path | None = None) -> tuple[int, int]:
    """(number of files, bytes) the cache wrote under its folder; (0, 0) when it does not exist yet."""
    contents = scan_cache(root)
    return len(contents.files), contents.size


def clear_cache(root: str | Path | None = None) -> int:
    """Delete what the cache wrote (shards, indexes, locks, the marker); returns the bytes freed.

    Entries the cache did not write stay, and so do the folders that hold them.

    Raises:
        CacheError: not a cache (see `scan_cache`), or another process is writing to it.
    """
    contents = scan_cache(root)
    size = contents.size
    for key_dir in contents.key_dirs:
        lock = key_dir / ".lock"
        try:  # a .lock is taken only when it is a plain file the cache wrote (never through a link)
            with filelock.FileLock(lock, timeout=0) if lock in contents.files else contextlib.nullcontext():
                for path in contents.files:
                    if path.parent == key_dir and path.name != ".lock":
                        path.unlink(missing_ok=True)
        except filelock.Timeout:
            raise CacheError(f"{key_dir}: another mmfuse process is writing to it; try again when it ends") from None
    for path in contents.files:
        path.unlink(missing_ok=True)
    for folder in [*contents.key_dirs, contents.root]:
        with contextlib.suppress(OSError):  # kept when something the cache did not write is still in it
            folder.rmdir()
    return size
