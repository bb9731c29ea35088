"""Feature cache for frozen encoders.

A frozen encoder's output depends only on its identity (`Encoder.cache_key()`: name, weights
hash, preprocessing) and on the input's content (image file bytes, text). So each distinct input
is encoded once, ever: features are stored on disk in safetensors shards, keyed by both, and
reused by every later epoch and run. A changed image, text, transform or weights file gives a new
key, so nothing stale is served.

Layout: `<cache_dir>/<encoder key>/index.json` maps an input's content hash to (shard, row);
`shard_NNNNN.safetensors` holds `pooled` (N, D) and, when tokens are kept, `tokens` (sum T_i, D)
with `offsets` (N + 1,) (padding is not stored; batches are re-padded to their longest item).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmfuse.encoders.base import Encoder, EncoderOutput
from mmfuse.utils import move_to

log = logging.getLogger(__name__)

SHARD_ITEMS = 4096


def default_cache_dir() -> Path:
    env = os.environ.get("MMFUSE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mmfuse" / "features"


def encoder_key(encoder: Encoder, tokens: bool) -> str:
    return hashlib.sha256(f"{encoder.cache_key()}|tokens={tokens}".encode()).hexdigest()[:20]


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

    def gather(self, rows: torch.Tensor) -> EncoderOutput:
        """rows: (B,) long -> EncoderOutput with tokens re-padded to the longest item of the batch."""
        loc = self.loc[rows]  # (B, 2)
        parts = []
        for shard_no in loc[:, 0].unique().tolist():
            sel = (loc[:, 0] == shard_no).nonzero().squeeze(1)
            parts.append((sel, self._from_shard(self.shards[shard_no], loc[sel, 1])))
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
        self.dir = Path(root or default_cache_dir()) / encoder_key(encoder, tokens)
        self.index: dict[str, list[int]] = {}
        self._read_index()

    def _read_index(self) -> None:
        index_file = self.dir / "index.json"
        if index_file.exists():
            self.index = json.loads(index_file.read_text())

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def build(self, raws: Sequence[str], batch_size: int = 32) -> tuple[FeatureTable, torch.Tensor]:
        """Encode what is missing, then return the table of distinct inputs and each raw's row (N,)."""
        hash_of = {r: self.encoder.content_hash(r) for r in dict.fromkeys(raws)}  # each distinct input once
        hashes = [hash_of[r] for r in raws]
        distinct = list(dict.fromkeys(hashes))
        if any(h not in self.index for h in distinct):
            with self._lock():  # another process (a DDP rank, a second run) may be filling the same cache
                self._read_index()
                missing = {h: r for h, r in zip(hashes, raws) if h not in self.index}
                if missing:
                    log.info("feature cache %s: encoding %d new %s inputs", self.dir, len(missing), self.modality)
                    self._encode_and_store(list(missing.items()), batch_size)
        table = self._load([self.index[h] for h in distinct])
        row_of = {h: i for i, h in enumerate(distinct)}
        return table, torch.tensor([row_of[h] for h in hashes], dtype=torch.long)

    @torch.inference_mode()
    def _encode_and_store(self, items: list[tuple[str, str]], batch_size: int) -> None:
        enc = self.encoder.eval()
        device = next((p.device for p in enc.parameters()), torch.device("cpu"))
        shard_no = max((s for s, _ in self.index.values()), default=-1) + 1
        for start in range(0, len(items), SHARD_ITEMS):
            chunk = items[start : start + SHARD_ITEMS]
            pooled, toks, lengths = [], [], []
            for b in range(0, len(chunk), batch_size):
                raws = [self._load_raw(r) for _, r in chunk[b : b + batch_size]]
                inputs = move_to(enc.collate([enc.preprocess(r) for r in raws]), device)
                out = enc(inputs)
                pooled.append(out.pooled.float().cpu())
                if self.keep_tokens:
                    if out.tokens is None:
                        raise ValueError(f"{self.modality} encoder gives no tokens but the fusion needs them")
                    mask = out.mask if out.mask is not None else torch.ones(out.tokens.shape[:2], dtype=torch.bool)
                    for t, m in zip(out.tokens.float().cpu(), mask.cpu()):
                        toks.append(t[m])
                        lengths.append(int(m.sum()))
            tensors = {"pooled": torch.cat(pooled)}
            if self.keep_tokens:
                tensors["tokens"] = torch.cat(toks)
                tensors["offsets"] = torch.tensor([0, *lengths]).cumsum(0)
            self._write_shard(shard_no, tensors, [h for h, _ in chunk])
            shard_no += 1

    def _load_raw(self, raw: str) -> object:
        return self.encoder.load(raw)

    def _write_shard(self, shard_no: int, tensors: dict[str, torch.Tensor], hashes: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"shard_{shard_no:05d}.safetensors"
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.dir / name)  # atomic: a reader never sees half a shard
        for row, h in enumerate(hashes):
            self.index[h] = [shard_no, row]
        tmp_index = self.dir / f".index.json.{os.getpid()}.tmp"
        tmp_index.write_text(json.dumps(self.index))
        os.replace(tmp_index, self.dir / "index.json")

    def _load(self, locations: list[list[int]]) -> FeatureTable:
        used = sorted({shard for shard, _ in locations})
        position = {shard: i for i, shard in enumerate(used)}
        # load_file memory-maps the file: nothing is read until rows are gathered.
        shards = [load_file(str(self.dir / f"shard_{shard:05d}.safetensors")) for shard in used]
        loc = torch.tensor([[position[shard], row] for shard, row in locations], dtype=torch.long)
        return FeatureTable(shards, loc.reshape(-1, 2))


def cache_size(root: str | Path | None = None) -> tuple[int, int]:
    """(number of files, bytes) under the cache directory."""
    root = Path(root or default_cache_dir())
    files = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    return len(files), sum(p.stat().st_size for p in files)


def clear_cache(root: str | Path | None = None) -> int:
    """Delete the cache directory; returns the bytes freed."""
    root = Path(root or default_cache_dir())
    _, size = cache_size(root)
    if root.exists():
        shutil.rmtree(root)
    return size
