"""From built objects to DataLoaders: validation, the feature cache of frozen encoders, batching.

Everything here takes the model, the records and plain options (`LoaderOptions`); the run config is read by
`mmfuse.builders` only. No function branches on a modality's or a task kind's name: it asks the encoders.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from mmfuse.builders import LoaderOptions
from mmfuse.config import ConfigError
from mmfuse.data.cache import FeatureCache, FeatureTable
from mmfuse.data.collate import Collator
from mmfuse.data.dataset import MultiModalDataset, encode_labels, validate_records
from mmfuse.data.grouping import BatchFetch, GroupedBatchSampler, input_groups
from mmfuse.data.records import Record
from mmfuse.data.sampling import EpochDistributedSampler, EpochRandomSampler, epoch_generator, epoch_seed
from mmfuse.data.shard_features import RowMap, ShardFeatures
from mmfuse.data.shards import ShardRows, ShardSamples, ShardSplit, open_stream, read_manifest
from mmfuse.encoders.base import EncoderOutput
from mmfuse.model import MultiTaskModel

log = logging.getLogger(__name__)


@dataclass
class Features:
    """Cached features of frozen encoders: a table of distinct inputs per modality, and per split the
    row of each record."""

    tables: dict[str, FeatureTable] = field(default_factory=dict)
    rows: dict[str, dict[str, torch.Tensor | RowMap]] = field(default_factory=dict)


GROUP_BATCHES_ALL_CACHED = (
    "data.group_batches: every encoder's features come from the feature cache, so there is no encoder "
    "pass to save; remove it, or fine-tune an encoder (freeze: false) or set train.cache=false"
)


def cached_modalities(model: MultiTaskModel, cache: bool) -> list[str]:
    """The modalities whose frozen encoders' features come from the feature cache."""
    out = []
    for m, enc in model.encoders.items():
        if not (enc.frozen and cache):
            continue
        if enc.augment:
            raise ConfigError(
                f"model.encoders.{m}: random augmentation and the feature cache exclude each other "
                "(cached features are computed once); set augment: false or train.cache=false"
            )
        out.append(m)
    return out


def build_features(
    model: MultiTaskModel, splits: Mapping[str, list[Record]], modalities: list[str], cache_dir: str | None = None
) -> Features:
    """Encode (or read back) the distinct inputs of the cached modalities; each record gets its row."""
    feats = Features(rows={s: {} for s in splits})
    if modalities and any(isinstance(r, ShardSplit) for r in splits.values()):
        return shard_set_features(model, splits, modalities, cache_dir)  # type: ignore[arg-type]
    for m in modalities:
        enc = model.encoders[m]
        cache = FeatureCache(enc, m, cache_dir, tokens=model.fusion.needs_tokens and enc.has_tokens)
        refs, bounds = [], {}
        for s, records in splits.items():
            start = len(refs)
            refs += [r.inputs.get(m) for r in records]
            bounds[s] = (start, len(refs))
        if any(r is None for r in refs):
            raise ConfigError(f"train.cache: some records have no {m}; set train.cache=false to train on them")
        table, rows = cache.build(refs)
        feats.tables[m] = table
        for s, (a, b) in bounds.items():
            feats.rows[s][m] = rows[a:b]
        log.info("%s features: %d distinct inputs for %d records (cache %s)", m, len(table), len(refs), cache.dir)
    return feats


def shard_set_features(
    model: MultiTaskModel, splits: Mapping[str, ShardSplit], modalities: list[str], cache_dir: str | None = None
) -> Features:
    """The features of the cached modalities over a shard set, kept inside it (`mmfuse.data.shard_features`):
    computed once for the whole set by the first process to get there, read by row by every rank."""
    folder = next(iter(splits.values())).folder
    if cache_dir is not None:
        log.warning("train.cache_dir: not used with data.source=shards; features are kept in %s/features", folder)
    manifest = read_manifest(folder)
    feats = Features(rows={s: {} for s in splits})
    for m in modalities:
        enc = model.encoders[m]
        store = ShardFeatures(folder, manifest, m, enc, model.fusion.needs_tokens and enc.has_tokens)
        feats.tables[m], rows = store.build()
        for s in splits:
            feats.rows[s][m] = rows[s]
        log.info("%s features: %d distinct inputs (%s)", m, len(feats.tables[m]), store.dir)
    return feats


class CachedCollator:
    """Wraps a Collator: adds `features` for the cached modalities, gathered by record index."""

    def __init__(self, base: Collator, tables: Mapping[str, FeatureTable], rows: Mapping[str, torch.Tensor]):
        self.base, self.tables, self.rows = base, dict(tables), dict(rows)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(samples)
        if self.tables:
            idx = batch["index"]
            batch["features"] = {m: t.gather(self.rows[m][idx]) for m, t in self.tables.items()}
        return batch


class CachedRows(Dataset):
    """A split whose every input is a cached feature: `dataset[idx]` is a whole batch, gathered with one
    `index_select` per tensor. Labels and masks are collated once for the split, so a batch costs no
    per-sample Python work (no `__getitem__` per record, no collation of lists).

    Args:
        labels / masks: {task: (N, ...) collated labels, (N,) bool}.
        tables: {modality: FeatureTable}; rows: {modality: (N,) long, the table row of each record}.
    """

    def __init__(
        self,
        labels: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        tables: Mapping[str, FeatureTable],
        rows: Mapping[str, torch.Tensor],
    ) -> None:
        self.labels, self.masks, self.tables = labels, masks, dict(tables)
        self.n = len(next(iter(masks.values()))) if masks else len(next(iter(rows.values())))
        # Pooled-only tables: each record's row in one (N_distinct, D) tensor (a view of a single shard).
        self.pooled: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows = {m: rows[m] for m in self.tables}
        for m, table in self.tables.items():
            if not table.has_tokens and table.shards:
                flat = _flat_pooled(table)
                sizes = torch.tensor([0] + [len(s["pooled"]) for s in table.shards[:-1]]).cumsum(0)
                loc = table.loc[rows[m]]  # (N, 2): (shard, row)
                self.pooled[m] = (flat, sizes[loc[:, 0]] + loc[:, 1])

    def __len__(self) -> int:
        return self.n

    def collate(self, items: dict[str, Any] | list[int]) -> dict[str, Any]:
        """`collate_fn`: a whole batch passes through; a list of record positions is gathered as one."""
        if isinstance(items, dict):
            return items
        return self[torch.tensor(items, dtype=torch.long)]  # type: ignore[return-value]

    def __getitem__(self, idx: torch.Tensor | int) -> dict[str, Any] | int:
        """idx: (B,) long record positions -> the batch (the same keys as `Collator` + `CachedCollator`).

        An int (a per-record sampler, e.g. the DDP evaluation shards) is returned as it is: `collate` batches it.
        """
        if isinstance(idx, int):
            return idx
        feats: dict[str, EncoderOutput] = {}
        for m, table in self.tables.items():
            if m in self.pooled:
                flat, at = self.pooled[m]
                feats[m] = EncoderOutput(flat.index_select(0, at.index_select(0, idx)))
            else:
                feats[m] = table.gather(self.rows[m].index_select(0, idx))
        return {
            "index": idx,
            "inputs": {},
            "absent": {},
            "labels": {t: v.index_select(0, idx) for t, v in self.labels.items()},
            "masks": {t: v.index_select(0, idx) for t, v in self.masks.items()},
            "features": feats,
        }


def _flat_pooled(table: FeatureTable) -> torch.Tensor:
    """All pooled rows of a table in shard order: the shard itself when there is one (no copy)."""
    if len(table.shards) == 1:
        return table.shards[0]["pooled"]
    return torch.cat([s["pooled"] for s in table.shards])


class IndexBatchSampler(BatchSampler):
    """torch's `BatchSampler` over `EpochRandomSampler` (shuffle) or the records in order, its batches as (B,) long
    tensors: the same batches as `EpochRandomSampler` + a `batch_size` DataLoader (so a resumed run repeats them).

    With `distributed` (shuffled only), the sampler is `EpochDistributedSampler`: rank r of W takes positions r, r + W,
    ... of the epoch's permutation, padded as that sampler pads, so each rank gets the batches that sampler + a
    `batch_size` DataLoader would give it (disjoint shards, together every record); the world is read when iterating.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, distributed: bool = False) -> None:
        if distributed and not shuffle:
            raise ValueError("IndexBatchSampler: distributed batches are training batches: shuffle=True")
        if shuffle:
            sampler = (EpochDistributedSampler if distributed else EpochRandomSampler)(range(n), seed)
        else:
            sampler = SequentialSampler(range(n))
        super().__init__(sampler, batch_size, drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning each epoch (it does not look inside a DataLoader's `sampler`)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[torch.Tensor]:  # type: ignore[override]
        # One permutation an epoch, cut into views: no Python list and no tensor built from one per batch. The same
        # batches as the samplers' own orders (the documented permutation); a generator, so it draws after
        # Lightning's set_epoch.
        s = self.sampler
        if isinstance(s, SequentialSampler):
            yield from torch.arange(len(s)).split(self.batch_size)
            return
        n = len(s.dataset) if isinstance(s, EpochDistributedSampler) else len(s.data_source)
        order = torch.randperm(n, generator=epoch_generator(s.seed, s.epoch))
        if isinstance(s, EpochDistributedSampler):  # padded by repeating the permutation from its start, then dealt
            total = s.total_size
            order = order.repeat(-(-total // n))[:total][s.rank : total : s.num_replicas]
        yield from order.split(self.batch_size)


AUTO_STEPS_PER_CALL = 4  # `train.steps_per_call: auto` on an all-cached training split


class CachedBatches:
    """The training batches of a `CachedRows` split straight from memory: `dataset[idx]` for each (B,) index tensor
    of `sampler`, with no DataLoader between (its fetcher and iterator cost ~4% of a batch-32 cached step,
    benchmarks/README.md). Lightning takes it as a plain iterable with a length and calls `sampler.set_epoch` each
    epoch, as it does on a DataLoader's, so the batches and their order are the same: (seed, epoch) and the rank.

    No pinned memory (a DataLoader's `pin_memory` left the features, the bulk of a batch, unpinned anyway), no
    `state_dict`: a resume inside an epoch reads the epoch from its start, as with any records loader.

    With `steps_per_call` k > 1 it yields lists of k consecutive batches (the last list of an epoch may be shorter),
    and `MMFuseModule.training_step` takes one whole optimiser step for each: the same batches in the same order,
    with Lightning's per-batch loop (fetcher, hooks, progress) paid once per k steps, as Keras's
    `steps_per_execution` does. `len()` counts the lists (Lightning's batches), `steps` the batches.
    """

    def __init__(self, dataset: CachedRows, sampler: IndexBatchSampler, steps_per_call: int = 1) -> None:
        self.dataset, self.sampler, self.steps_per_call = dataset, sampler, steps_per_call

    @property
    def steps(self) -> int:
        """Optimiser steps an epoch: this rank's batches."""
        return len(self.sampler)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.steps_per_call)

    def __iter__(self) -> Iterator[dict[str, Any] | list[dict[str, Any]]]:
        # A DataLoader's iterator draws its workers' base seed from the global generator: drawn here too, so the
        # random numbers of the steps (dropout, OGM-GE's noise, PCGrad's order) stay those of the DataLoader path.
        torch.empty((), dtype=torch.int64).random_()
        batches = map(self.dataset.__getitem__, self.sampler)  # lazy: the order is drawn at the first batch
        if self.steps_per_call == 1:
            return batches
        return iter(lambda: list(itertools.islice(batches, self.steps_per_call)), [])


def cached_loader(
    model: MultiTaskModel,
    records: list[Record],
    split: str,
    features: Features,
    options: LoaderOptions,
    distributed: bool = False,
) -> DataLoader | CachedBatches:
    """The loader of a split whose inputs all come from the feature cache: the training split as `CachedBatches`
    (this rank's share under DDP), an evaluation split as a DataLoader of the same whole batches (single process)."""
    encoded = [encode_labels(r, model.tasks) for r in records]
    labels, masks = {}, {}
    for name, task in model.tasks.items():
        labels[name], masks[name] = task.collate([e[name] for e in encoded])
    dataset = CachedRows(labels, masks, features.tables, features.rows.get(split, {}))
    if split == "train":
        batches = IndexBatchSampler(len(records), options.batch_size, True, options.seed, distributed)
        steps = AUTO_STEPS_PER_CALL if options.steps_per_call is None else options.steps_per_call
        return CachedBatches(dataset, batches, steps)
    return DataLoader(
        dataset,
        sampler=IndexBatchSampler(len(records), options.eval_batch_size, shuffle=False),
        batch_size=None,  # the sampler yields whole batches
        collate_fn=dataset.collate,
        num_workers=0,  # batches are gathered from memory: workers would only add overhead
        pin_memory=torch.cuda.is_available(),
    )


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar text length (less padding), in a shuffled order each epoch.

    Indices are shuffled, cut into pools of `pool` batches, sorted by length inside a pool, batched,
    and the batches shuffled: randomness stays, padding mostly goes.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, pool: int = 50) -> None:
        self.lengths, self.batch_size, self.seed, self.pool = lengths, batch_size, seed, pool
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning each epoch: the order depends on (seed, epoch) only, so resuming repeats it."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(epoch_seed(self.seed, self.epoch))
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        size = self.batch_size * self.pool
        batches = []
        for a in range(0, len(idx), size):
            chunk = sorted(idx[a : a + size], key=self.lengths.__getitem__)
            batches += [chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


def default_workers(options: LoaderOptions, uncached: list[str]) -> int:
    if options.num_workers is not None:
        return options.num_workers
    if not uncached:
        return 0  # batches are gathered from memory: workers would only add overhead
    return min(2, os.cpu_count() or 1)


def record_lengths(model: MultiTaskModel, records: list[Record], modalities: list[str]) -> list[int] | None:
    """Per record, the summed `length` of its inputs of `modalities`; None when no encoder has lengths."""
    encoders = {m: model.encoders[m] for m in modalities}
    lengths, any_length = [], False
    for r in records:
        total = 0
        for m, enc in encoders.items():
            ref = r.inputs.get(m)
            n = enc.length(ref) if ref is not None else None
            if n is not None:
                total, any_length = total + n, True
        lengths.append(total)
    return lengths if any_length else None


def make_loader(
    model: MultiTaskModel,
    records: list[Record],
    split: str,
    features: Features,
    options: LoaderOptions,
    distributed: bool = False,
    dedupe: bool = True,
) -> DataLoader | CachedBatches:
    """The batches of one split: uncached inputs loaded by their encoders, cached ones gathered by row.

    When every input is cached (frozen encoders) and no loader worker is asked for, the split is served by
    `cached_loader`: whole batches by index, no per-record work (under DDP the training split only; the evaluation
    splits keep the per-record loader that `shard_eval_loader` shards). Otherwise each distinct input of a batch is
    loaded and encoded once (`dedupe`, see `shared_modalities`), and with `options.group_batches` the training
    batches keep records that share an input together (`GroupedBatchSampler`).
    """
    if isinstance(records, ShardSplit):
        return shard_loader(model, records, split, options, features)
    cached = set(features.tables)
    uncached = [m for m in model.encoders if m not in cached]
    train = split == "train"
    grouped = train and options.group_batches
    if not uncached and grouped:
        raise ConfigError(GROUP_BATCHES_ALL_CACHED)
    if not uncached and records and options.num_workers in (None, 0) and (train or not distributed):
        return cached_loader(model, records, split, features, options, distributed)
    if train:
        check_steps_per_call(options)
    encoders = {m: model.encoders[m] for m in uncached}
    shareable = shared_modalities(model, uncached, train)
    shared = shareable if dedupe else []
    dataset = MultiModalDataset(records, model.tasks, encoders, train=train, share=shared)
    base = Collator(encoders, model.tasks, dedupe=shared)
    collate = CachedCollator(base, features.tables, features.rows.get(split, {}))
    workers = default_workers(options, uncached)
    common: dict[str, Any] = dict(
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    batch_size = options.batch_size if train else options.eval_batch_size
    if grouped:
        by = grouping_modality(model, records, shareable)  # once: it scans every record
        groups = input_groups([r.inputs.get(by) for r in records])
        sampler = GroupedBatchSampler(groups, batch_size, options.seed)
        return DataLoader(BatchFetch(dataset), sampler=sampler, batch_size=None, **common)
    lengths = record_lengths(model, records, uncached) if train and options.bucket_by_length else None
    if lengths is not None and not distributed:
        return DataLoader(dataset, batch_sampler=LengthBucketSampler(lengths, batch_size, options.seed), **common)
    sampler = None
    if train:  # the same permutation of (seed, epoch) on one process and dealt out to the ranks of several
        sampler = (EpochDistributedSampler if distributed else EpochRandomSampler)(dataset, options.seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **common)


def check_steps_per_call(options: LoaderOptions) -> None:
    """ConfigError (one line) when more than one step per Lightning step is asked of a training split that is not
    served from the feature cache (`CachedBatches`), rather than ignoring it."""
    if options.steps_per_call is not None and options.steps_per_call > 1:
        raise ConfigError(
            f"train.steps_per_call: {options.steps_per_call} needs the training inputs all from the feature cache "
            "(frozen encoders, train.cache: true, no loader workers, records rather than shards); use 1 or auto"
        )


def shard_loader(
    model: MultiTaskModel, split: ShardSplit, name: str, options: LoaderOptions, features: Features | None = None
) -> DataLoader:
    """A split of a shard set: training streams it (LitData: chunks shuffled by seed and epoch, partitioned over
    ranks and loader workers); evaluation reads it in order by position (sharded over DDP ranks by the caller).
    The cached modalities' features are gathered by each record's row (`features`); their inputs are not read."""
    train = name == "train"
    if train:
        check_steps_per_call(options)
    tables = features.tables if features is not None else {}
    uncached = [m for m in model.encoders if m not in tables]
    encoders = {m: model.encoders[m] for m in uncached}
    samples = ShardSamples(encoders, model.tasks, name, train, split.fast_json)
    base = Collator(encoders, model.tasks, dedupe=shared_modalities(model, uncached, train))
    collate = CachedCollator(base, tables, features.rows.get(name, {})) if features is not None and tables else base
    workers = default_workers(options, uncached)
    if train:
        from mmfuse.data.shard_stream import stream_loader

        return stream_loader(open_stream(split, samples, True, options.seed), options.batch_size, collate, workers)
    rows = ShardRows(split, samples)
    return DataLoader(rows, batch_size=options.eval_batch_size, collate_fn=collate, num_workers=workers)


def shared_modalities(model: MultiTaskModel, uncached: list[str], train: bool) -> list[str]:
    """The uncached modalities whose distinct inputs a batch loads and encodes once: all but those whose
    preprocessing is random in training (augmentation gives every record its own view)."""
    return [m for m in uncached if not (train and model.encoders[m].augment)]


def grouping_modality(model: MultiTaskModel, records: list[Record], shared: list[str]) -> str:
    """The modality whose shared inputs `data.group_batches` keeps together: the first file-backed one whose
    references repeat (an image), else the one with the fewest distinct inputs. ConfigError when none repeats."""
    if not shared:
        raise ConfigError(
            "data.group_batches: the encoded inputs are augmented at random in training, so no two records share "
            "an encoder pass; remove it or set augment: false"
        )
    distinct = {m: len({r.inputs.get(m) for r in records if r.inputs.get(m) is not None}) for m in shared}
    present = {m: sum(r.inputs.get(m) is not None for r in records) for m in shared}
    repeating = [m for m in shared if distinct[m] < present[m]]
    if not repeating:
        raise ConfigError(
            f"data.group_batches: no two training records share an input of {', '.join(shared)}; nothing to group"
        )
    files = [m for m in repeating if model.encoders[m].groups_records]
    return files[0] if files else min(repeating, key=distinct.__getitem__)


def check_records(
    model: MultiTaskModel, splits: dict[str, list[Record]], skip_bad: bool = False
) -> tuple[dict[str, list[Record]], list[tuple[str, str]]]:
    """Validate every record up front; with `skip_bad`, drop and list the bad ones."""
    bad_all: list[tuple[str, str]] = []
    for s in list(splits):
        if isinstance(splits[s], ShardSplit):  # validated when packed; the shards' checksums were checked
            continue
        good, bad = validate_records(splits[s], model.tasks, dict(model.encoders), skip_bad=skip_bad)
        splits[s] = good
        bad_all += bad
    return splits, bad_all
