"""`mmfuse pack`: a config's records, validated, into streaming shards; and a run's data read back from them.

`pack` reads each split through the records reader (`build_run_data`: the same one-line errors as `train`), checks
every record as `train` does (`validate_records`), fits what the config leaves to the training split (class lists,
tabular statistics) and writes each split with LitData (`mmfuse.data.shards`). The manifest ties the shards to the
config: the inputs (encoder name and the record fields it reads), the tasks (kind, field), the learned options, the
data options that fixed the splits, and the size and sha256 of every file.

`shard_run_data` is the other side (`data: {source: shards, path: DIR}`): the manifest must match the run's config
(else one line), every shard must be intact (else one line naming it), and the learned options come from the
manifest, so no record is read before training starts.

The config is read here as its plain resolved dict (`model_dump`): only its sections are compared and stored.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfuse.builders import RunData, build_encoders, build_run_data, build_tasks, loader_options
from mmfuse.config import ConfigError, RunConfig, parse_config
from mmfuse.data.dataset import validate_records
from mmfuse.data.records import Record
from mmfuse.data.shards import (
    DEFAULT_CHUNK_BYTES,
    MANIFEST,
    ShardError,
    chunk_bytes_of,
    has_vectors,
    label_encoding,
    read_manifest,
    record_item,
    split_of,
    verify_shards,
    write_manifest,
    write_split,
)
from mmfuse.encoders.base import Encoder
from mmfuse.tasks import Task

log = logging.getLogger(__name__)

# Data options that decide which records land in which split: fixed at pack time.
SPLIT_OPTIONS = ("root", "split_field", "group_by", "val_fraction", "test_fraction")
DATA_DEFAULTS = {"root": None, "split_field": "split", "group_by": None, "val_fraction": 0.1, "test_fraction": 0.0}


def file_modalities(encoders: Mapping[str, Encoder]) -> list[str]:
    """The modalities whose references may name input files (images, `.npy` vectors)."""
    return [m for m, e in encoders.items() if e.groups_records or e.file_suffixes]


def _items(records: list[Record], embed: list[str], tasks: Mapping[str, Task]) -> Iterator[dict[str, Any]]:
    vectors = has_vectors(records)
    for r in records:
        files = {}
        for m in embed:
            ref = r.inputs.get(m)
            files[m] = Path(ref).read_bytes() if isinstance(ref, str) else b""
        yield record_item(r, files, tasks, vectors)


def _learned(resolved: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """The options the fit added or changed (a resolved section against the config's own)."""
    return {k: v for k, v in resolved.items() if given.get(k) != v}


def describe(raw: Mapping[str, Any], encoders: Mapping[str, Encoder]) -> dict[str, Any]:
    """What ties records to a config: each input's encoder and the fields it reads, each task's kind and field."""
    inputs = {}
    for m, comp in raw["model"]["encoders"].items():
        field = comp.get("field") or m
        inputs[m] = {"encoder": comp["name"], "fields": encoders[m].fields(field)}
    tasks = {n: {"kind": t["kind"], "field": t.get("field") or n} for n, t in raw["tasks"].items()}
    return {"inputs": inputs, "tasks": tasks}


def pack(
    cfg: RunConfig,
    out: str | Path,
    embed_files: bool = False,
    chunk_bytes: str | int = DEFAULT_CHUNK_BYTES,
    features: bool = False,
) -> dict[str, Any]:
    """Write the config's records, split and validated, as shards in `out`; returns the manifest.

    With `features`, also compute the features of the config's frozen encoders into `out/features` (see
    `pack_features`; the returned manifest then has "features": {modality: distinct inputs}); when `out` already
    holds a shard set packed for this config, only that is done (or finished).

    Raises:
        ConfigError / DataError: one line (a bad config, a bad record, `out` not empty).
    """
    out = Path(out)
    chunk_bytes = chunk_bytes_of(chunk_bytes)  # a bad size fails here, before any record is read
    given = cfg.model_dump(mode="json")
    if given["data"]["source"] == "shards":
        raise ConfigError("data.source: already shards; pack a config that reads records (records or easy_vqa)")
    if features and (out / MANIFEST).is_file():
        return {**read_manifest(out), "features": pack_features(cfg, out)}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder; choose another --out")
    options = loader_options(cfg)
    skip_bad = options.skip_bad
    bad: list[tuple[str, str]] = []
    data = build_run_data(cfg, None, bad if skip_bad else None)
    if features:
        check_features(data.encoders, options.cache)  # before the records are written, not after
    resolved = data.cfg.model_dump(mode="json")
    tasks = build_tasks(data.cfg.tasks)
    embed = file_modalities(data.encoders) if embed_files else []
    checked = {}
    for split, records in data.splits.items():  # every record checked before anything is written
        checked[split], skipped = validate_records(records, tasks, data.encoders, skip_bad=skip_bad)
        bad += skipped
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, good in checked.items():
        if good:
            splits[split] = write_split(out, split, _items(good, embed, tasks), chunk_bytes)
            log.info("%s: %d records -> %s/%s", split, len(good), out, split)
    manifest = {
        **describe(resolved, data.encoders),
        "learned": {
            "encoders": {
                m: _learned(c, given["model"]["encoders"][m]) for m, c in resolved["model"]["encoders"].items()
            },
            "tasks": {n: _learned(t, given["tasks"][n]) for n, t in resolved["tasks"].items()},
        },
        "labels": label_encoding(tasks),  # the labels are stored encoded with these
        "data": {k: given["data"][k] for k in SPLIT_OPTIONS}
        | {"source": given["data"]["source"], "seed": given["seed"]},
        "embedded": embed,
        "splits": splits,
        "warnings": data.warnings,
        "bad_records": [f"{s}: {r}" for s, r in bad],
        "packed": {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "by": _versions()},
    }
    write_manifest(out, manifest)
    return {**manifest, "features": pack_features(cfg, out)} if features else manifest


def check_features(encoders: Mapping[str, Encoder], cache: bool) -> None:
    """`--features` on a config whose run would read no cached feature: ConfigError (one line)."""
    if not cache:
        raise ConfigError("--features: train.cache is false in this config, so no run of it reads features")
    if not any(e.frozen for e in encoders.values()):
        raise ConfigError("--features: no encoder of model.encoders is frozen (freeze: true); nothing to compute")


def pack_features(cfg: RunConfig, out: str | Path) -> dict[str, int]:
    """Compute the features of the config's frozen encoders into the shard set `out` (`out/features/...`), as a run
    from it with `train.cache: true` would at its start; resumes what an interrupted pass left.

    Returns:
        {modality: number of distinct inputs}.
    """
    from mmfuse.builders import build_data_model
    from mmfuse.train.data import build_features, cached_modalities

    raw = cfg.model_dump(mode="json")
    raw["data"].update(source="shards", path=str(out), train=None, val=None, test=None, limit=None)
    raw["data"]["group_batches"] = False
    # Seeded as `mmfuse train` seeds before it builds the encoders (Lightning's `seed_everything`): an encoder with
    # random weights gets the run's weights, hence its cache_key, and the run finds these features.
    options = loader_options(cfg)
    random.seed(options.seed)
    np.random.seed(options.seed)
    torch.manual_seed(options.seed)
    data = shard_run_data(parse_config(raw))  # the manifest checked against the config, the shards verified
    check_features(data.encoders, options.cache)
    model = build_data_model(data)
    feats = build_features(model, data.splits, cached_modalities(model, True))
    return {m: len(t) for m, t in feats.tables.items()}


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import mmfuse

    return {"mmfuse": mmfuse.__version__, "litdata": version("litdata")}


# ---------------------------------------------------------------------- reading a run's data from shards
def _refuse(folder: str, what: str) -> ShardError:
    return ShardError(f"{Path(folder) / MANIFEST}: packed for another config: {what}; pack the data again with it")


def check_manifest(folder: str, manifest: Mapping[str, Any], raw: Mapping[str, Any], encoders: Mapping[str, Encoder]):
    """The run's inputs, tasks and split options against the manifest's; ShardError (one line) at the first
    difference."""
    here = describe(raw, encoders)
    for key, section in (("model.encoders", "inputs"), ("tasks", "tasks")):
        theirs, ours = manifest.get(section, {}), here[section]
        if set(theirs) != set(ours):
            raise _refuse(folder, f"{key} are {', '.join(ours)} here, {', '.join(theirs) or 'none'} there")
        for name, value in ours.items():
            if theirs[name] != value:
                raise _refuse(folder, f"{key}.{name} is {value} here, {theirs[name]} there")
    for k in SPLIT_OPTIONS:
        ours, theirs = raw["data"][k], manifest.get("data", {}).get(k)
        if ours not in (theirs, DATA_DEFAULTS[k]):
            raise _refuse(folder, f"data.{k} is {ours!r} here, {theirs!r} there (the splits are fixed when packing)")


def check_labels(folder: str, manifest: Mapping[str, Any], tasks: Mapping[str, Task]) -> None:
    """The run's tasks encode labels as those the shards hold were encoded when packing (kind and classes); else
    ShardError (one line): the stored class indices would mean other classes."""
    theirs = manifest.get("labels", {})
    for name, ours in label_encoding(tasks).items():
        if theirs.get(name) != ours:
            raise _refuse(
                folder,
                f"tasks.{name} encodes labels with {ours} here, the shards' labels were encoded with "
                f"{theirs.get(name)}",
            )


def _apply_learned(folder: str, section: dict[str, Any], learned: Mapping[str, Any], where: str) -> bool:
    """Write the manifest's learned options into a config section; a different value already set is refused."""
    changed = False
    for k, v in learned.items():
        if section.get(k) is not None and section[k] != v:
            raise _refuse(folder, f"{where}.{k} is set to another value here than the one learned when packing")
        changed |= section.get(k) != v
        section[k] = v
    return changed


def shard_run_data(cfg: RunConfig, encoders: Mapping[str, Encoder] | None = None) -> RunData:
    """A run's data from a shard set: checked against the config, its learned options written in.

    Raises:
        ConfigError: options that do not apply to shards.
        ShardError: not a shard set, packed for another config, a missing, truncated or altered shard.
    """
    raw = cfg.model_dump(mode="json")
    d = raw["data"]
    folder = d["path"]
    if folder is None or any(d[s] is not None for s in ("train", "val", "test")):
        raise ConfigError(
            "data.path: name the shard folder written by `mmfuse pack` (data.train/val/test do not apply)"
        )
    for key in ("limit", "group_batches"):
        if d[key]:
            raise ConfigError(f"data.{key}: not supported with data.source=shards (pack a smaller set instead)")
    manifest = read_manifest(folder)
    built = dict(encoders) if encoders is not None else build_encoders(cfg.model)
    check_manifest(folder, manifest, raw, built)
    verify_shards(folder, manifest)
    rebuild = []
    for m, learned in manifest["learned"]["encoders"].items():
        if _apply_learned(folder, raw["model"]["encoders"][m], learned, f"model.encoders.{m}"):
            rebuild.append(m)
    for name, learned in manifest["learned"]["tasks"].items():
        _apply_learned(folder, raw["tasks"][name], learned, f"tasks.{name}")
    resolved = parse_config(raw)
    check_labels(folder, manifest, build_tasks(resolved.tasks))
    if rebuild and encoders is None:
        built.update(build_encoders(resolved.model))
    elif rebuild:
        raise _refuse(folder, f"model.encoders.{rebuild[0]} was fitted on other data")
    splits: dict[str, Any] = {s: split_of(folder, s, v) for s, v in manifest["splits"].items()}
    return RunData(resolved, built, splits, list(manifest.get("warnings", [])))
