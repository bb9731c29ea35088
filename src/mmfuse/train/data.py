"""From a run config to DataLoaders: records, label vocabularies, validation, feature cache, batching."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from mmfuse.config import ConfigError, RunConfig
from mmfuse.data.cache import FeatureCache, FeatureTable
from mmfuse.data.collate import Collator
from mmfuse.data.dataset import MultiModalDataset, validate_records
from mmfuse.data.records import Record, infer_classes, load_record_splits
from mmfuse.model import MultiTaskModel

log = logging.getLogger(__name__)


def load_splits(cfg: RunConfig, errors: list[tuple[str, str]] | None = None) -> dict[str, list[Record]]:
    """The records of each split ("train", "val", "test" where present), labels keyed by task name.

    With `errors` (data.skip_bad), unreadable rows are listed there and skipped instead of raising.
    """
    d = cfg.data
    if d.source == "easy_vqa":
        from mmfuse.data.easy_vqa import load_easy_vqa

        return load_easy_vqa(val_fraction=d.val_fraction, seed=cfg.seed, limit=d.limit)
    fields = {name: tc.field or name for name, tc in cfg.tasks.items()}
    splits = load_record_splits(
        train=d.train,
        val=d.val,
        test=d.test,
        path=d.path,
        label_fields=fields,
        image_root=d.image_root,
        image_field=d.image_field,
        text_field=d.text_field,
        split_field=d.split_field,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=cfg.seed,
        errors=errors,
    )
    if d.limit:  # a seeded sample of each split, for quick runs
        rng = random.Random(cfg.seed)
        splits = {k: rng.sample(v, min(d.limit, len(v))) for k, v in splits.items()}
    return splits


def resolve_classes(cfg: RunConfig, splits: Mapping[str, list[Record]]) -> RunConfig:
    """Fill in every classification task's classes (from easy-VQA's vocabulary or the training
    records), so the saved config alone rebuilds the model."""
    tasks = {}
    for name, tc in cfg.tasks.items():
        if tc.classes is None and tc.kind in ("multiclass", "multilabel"):
            if cfg.data.source == "easy_vqa":
                from mmfuse.data.easy_vqa import EASY_VQA_TASKS

                if name not in EASY_VQA_TASKS:
                    raise ConfigError(
                        f"tasks.{name}: easy_vqa has no task {name!r}; it has {', '.join(EASY_VQA_TASKS)}"
                    )
                classes = list(EASY_VQA_TASKS[name]["classes"])
            else:
                classes = infer_classes(splits.get("train", []), name, multilabel=tc.kind == "multilabel")
                if not classes:
                    raise ConfigError(
                        f"tasks.{name}: no labels for it in the training records; set tasks.{name}.classes"
                    )
            tc = tc.model_copy(update={"classes": classes})
        tasks[name] = tc
    return cfg.model_copy(update={"tasks": tasks})


@dataclass
class Features:
    """Cached features of frozen encoders: a table of distinct inputs per modality, and per split the
    row of each record."""

    tables: dict[str, FeatureTable] = field(default_factory=dict)
    rows: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def cached_modalities(cfg: RunConfig, model: MultiTaskModel) -> list[str]:
    out = []
    for m, enc in model.encoders.items():
        if not (enc.frozen and cfg.train.cache):
            continue
        if getattr(enc, "augment", False):
            raise ConfigError(
                f"model.encoders.{m}: random augmentation and the feature cache exclude each other "
                "(cached features are computed once); set augment: false or train.cache=false"
            )
        out.append(m)
    return out


def build_features(
    cfg: RunConfig, model: MultiTaskModel, splits: Mapping[str, list[Record]], modalities: list[str]
) -> Features:
    feats = Features(rows={s: {} for s in splits})
    for m in modalities:
        enc = model.encoders[m]
        tokens = model.fusion.needs_tokens and (enc.modality == "text" or bool(getattr(enc, "tokens", False)))
        cache = FeatureCache(enc, m, cfg.train.cache_dir, tokens=tokens)
        raws, bounds = [], {}
        for s, records in splits.items():
            start = len(raws)
            raws += [getattr(r, m) for r in records]
            bounds[s] = (start, len(raws))
        if any(r is None for r in raws):
            raise ConfigError(f"train.cache: some records have no {m}; set train.cache=false to train on them")
        if m == "text":
            raws = [enc.preprocess(r) for r in raws]
        table, rows = cache.build(raws)
        feats.tables[m] = table
        for s, (a, b) in bounds.items():
            feats.rows[s][m] = rows[a:b]
        log.info("%s features: %d distinct inputs for %d records (cache %s)", m, len(table), len(raws), cache.dir)
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


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that depends on (seed, epoch) only, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


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
        rng = random.Random(self.seed * 100_003 + self.epoch)
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


def default_workers(cfg: RunConfig, uncached: list[str]) -> int:
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    if not uncached:
        return 0  # batches are gathered from memory: workers would only add overhead
    return min(2, os.cpu_count() or 1)


def make_loader(
    cfg: RunConfig,
    model: MultiTaskModel,
    records: list[Record],
    split: str,
    features: Features,
    distributed: bool = False,
) -> DataLoader:
    cached = set(features.tables)
    uncached = [m for m in model.encoders if m not in cached]
    processors = {m: model.encoders[m] for m in uncached}
    train = split == "train"
    dataset = MultiModalDataset(records, model.tasks, processors, train=train)
    collate = CachedCollator(Collator(processors, model.tasks), features.tables, features.rows.get(split, {}))
    workers = default_workers(cfg, uncached)
    common: dict[str, Any] = dict(
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    batch_size = cfg.data.batch_size if train else cfg.data.eval_batch_size
    if train and "text" in uncached and cfg.data.bucket_by_length and not distributed:
        lengths = [len(r.text or "") for r in records]
        return DataLoader(dataset, batch_sampler=LengthBucketSampler(lengths, batch_size, cfg.seed), **common)
    sampler = EpochShuffleSampler(len(dataset), cfg.seed) if train and not distributed else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=train and distributed, **common)


def check_records(
    cfg: RunConfig, model: MultiTaskModel, splits: dict[str, list[Record]]
) -> tuple[dict[str, list[Record]], list[tuple[str, str]]]:
    """Validate every record up front; with data.skip_bad, drop and list the bad ones."""
    bad_all: list[tuple[str, str]] = []
    for s in list(splits):
        good, bad = validate_records(splits[s], model.tasks, list(model.encoders), skip_bad=cfg.data.skip_bad)
        splits[s] = good
        bad_all += bad
    return splits, bad_all
