"""Builders: turn a validated config into objects, passing flat arguments (torchtune's rule: configs never
intrude into the classes). The only readers of a `RunConfig`: every other module gets built objects, plain options
or a `RunOutline`, and may hand a config on whole (tests/test_config_readers.py checks it)."""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmfuse.config import (
    Component,
    ConfigError,
    DataConfig,
    EncoderConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    component_options,
    parse_config,
)
from mmfuse.data.records import Record, Schema, load_record_splits, shared_inputs
from mmfuse.encoders.base import Encoder
from mmfuse.fusion.base import Fusion
from mmfuse.model import MultiTaskModel
from mmfuse.tasks import TASK_KINDS, MLPHead, Task, build_task
from mmfuse.text import is_blank, one_line

log = logging.getLogger(__name__)

# What an encoder's or a task's constructor raises for a bad option value (an unknown model, a missing file).
_BUILD_ERRORS = (ValueError, OSError, ImportError, RuntimeError)


# ---------------------------------------------------------------------- encoders, tasks, model
def build_encoder(modality: str, comp: EncoderConfig) -> Encoder:
    """One encoder; a bad option value (unknown model, missing weights file) is one ConfigError line."""
    from mmfuse.encoders import ENCODERS

    opts = component_options(ENCODERS, comp, f"model.encoders.{modality}")
    try:
        return ENCODERS.get(comp.name)(**opts)
    except _BUILD_ERRORS as err:
        raise ConfigError(f"model.encoders.{modality}: {one_line(err)}") from None


def build_encoders(model_cfg: ModelConfig) -> dict[str, Encoder]:
    return {m: build_encoder(m, comp) for m, comp in model_cfg.encoders.items()}


def build_fusion(comp: Component, input_dims: Mapping[str, int], grids: Sequence[str] | None = None) -> Fusion:
    """The fusion of `comp` over `input_dims`; `grids` names the modalities whose encoders give 2-D token grids.

    A fusion with a `spatial` option left at "auto" gets the one grid modality from `grids` (asked of the
    encoders, never guessed from a modality's name), or None when there is none or more than one.
    """
    from mmfuse.fusion import FUSIONS

    opts = component_options(FUSIONS, comp, "model.fusion")
    cls = FUSIONS.get(comp.name)
    if grids is not None and opts.get("spatial", "auto") == "auto" and "spatial" in inspect.signature(cls).parameters:
        opts["spatial"] = grids[0] if len(grids) == 1 else None
    if grids is not None and getattr(cls, "needs_grid", False) and opts.get("spatial") not in grids:
        raise ConfigError(_no_grid(comp.name, opts.get("spatial"), grids))
    try:
        return cls(input_dims=dict(input_dims), **opts)
    except (ValueError, TypeError, RuntimeError, OverflowError) as err:  # torch: a size it cannot allocate
        raise ConfigError(f"model.fusion: {one_line(err)}") from None


def build_tasks(tasks: Mapping[str, TaskConfig], classes: Mapping[str, list[str]] | None = None) -> dict[str, Task]:
    """Tasks from their configs; `classes` fills in class lists the config leaves out."""
    out: dict[str, Task] = {}
    for name, tc in tasks.items():
        opts: dict[str, Any] = {"weight": tc.weight, **tc.options}
        cls = tc.classes if tc.classes is not None else (classes or {}).get(name)
        if cls is not None:
            opts["classes"] = cls
        try:
            out[name] = build_task(name, tc.kind, **opts)
        except KeyError as err:
            raise ConfigError(f"tasks.{name}.kind: {err.args[0]}") from None
        except (ValueError, TypeError) as err:
            hint = "" if cls is not None else " (or let them be inferred from training records)"
            raise ConfigError(f"tasks.{name}: {err}{hint}") from None
    return out


def data_location(cfg: RunConfig) -> tuple[str | None, bool]:
    """(data.root, data.allow_outside_root) of a run: where its records' file paths resolve, and whether
    absolute paths may leave that folder."""
    return cfg.data.root, cfg.data.allow_outside_root


def build_model_from(
    model_cfg: ModelConfig, tasks: Mapping[str, Task], encoders: Mapping[str, Encoder] | None = None
) -> MultiTaskModel:
    """The model from its config section; `encoders` (already built and fitted) are used when given."""
    encoders = dict(encoders) if encoders is not None else build_encoders(model_cfg)
    grids = [m for m, e in encoders.items() if e.modality == "image" and e.has_tokens]  # flattened feature maps
    fusion = build_fusion(model_cfg.fusion, {m: e.output_dim for m, e in encoders.items()}, grids)
    reader = getattr(fusion, "reader", None)  # a fusion that reads its question through fusion/question.py
    if reader is not None and reader.needs_tokens and not encoders[fusion.question].has_tokens:
        raise ConfigError(
            f"model.fusion.question: {reader.reader} reads the {fusion.question} tokens, but "
            f"model.encoders.{fusion.question} ({model_cfg.encoders[fusion.question].name}) gives none; "
            "use question: pooled"
        )
    head = model_cfg.head
    heads = {n: MLPHead(fusion.output_dim, t.out_dim, head.hidden_dims, head.dropout) for n, t in tasks.items()}
    return MultiTaskModel(encoders, fusion, tasks, heads)


def build_model(
    config: RunConfig | Mapping[str, Any] | str | Path, classes: Mapping[str, list[str]] | None = None
) -> MultiTaskModel:
    """Build the whole model from a run config (object, dict or YAML path).

    Example:
        >>> model = build_model({
        ...     "model": {"encoders": {"image": {"name": "torchvision", "model": "resnet18"},
        ...                            "text": {"name": "hf_text", "model": "minilm"}},
        ...               "fusion": {"name": "concat", "output_dim": 256}},
        ...     "tasks": {"label": {"kind": "binary"}}})
    """
    if isinstance(config, (str, Path)):
        config = yaml.safe_load(Path(config).read_text())
    cfg = config if isinstance(config, RunConfig) else parse_config(config)
    return build_model_from(cfg.model, build_tasks(cfg.tasks, classes))


# ---------------------------------------------------------------------- data
def build_schema(cfg: RunConfig, encoders: Mapping[str, Encoder]) -> Schema:
    """How the records' rows become records: each modality's encoder and field, each task's label field."""
    group_by = cfg.data.group_by
    return Schema(
        encoders=dict(encoders),
        fields={m: comp.field or m for m, comp in cfg.model.encoders.items()},
        labels={name: tc.field or name for name, tc in cfg.tasks.items()},
        split_field=cfg.data.split_field or None,
        group_by=group_by,
    )


def load_splits(cfg: RunConfig, schema: Schema, errors: list[tuple[str, str]] | None = None) -> dict[str, list[Record]]:
    """The records of each split ("train", "val", "test" where present), labels keyed by task name.

    With `errors` (data.skip_bad), unreadable rows are listed there and skipped instead of raising.
    """
    d = cfg.data
    _check_group_by(cfg)
    if d.source == "easy_vqa":
        from mmfuse.data.easy_vqa import load_easy_vqa

        return load_easy_vqa(schema, val_fraction=d.val_fraction, seed=cfg.seed, limit=d.limit, errors=errors)
    if d.path is None and d.train is None:
        raise ConfigError("data: give data.path (one records file) or data.train (and data.val/test)")
    if d.path is not None and any(p is not None for p in (d.train, d.val, d.test)):
        raise ConfigError("data: give either data.path or data.train/val/test, not both")
    splits = load_record_splits(
        schema,
        train=d.train,
        val=d.val,
        test=d.test,
        path=d.path,
        root=d.root,
        allow_outside_root=d.allow_outside_root,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=cfg.seed,
        errors=errors,
    )
    if d.limit:  # a seeded sample of each split, for quick runs
        rng = random.Random(cfg.seed)
        splits = {k: rng.sample(v, min(d.limit, len(v))) for k, v in splits.items()}
    return splits


def _check_group_by(cfg: RunConfig) -> None:
    g = cfg.data.group_by
    if g is not None and is_blank(g):
        raise ConfigError("data.group_by: empty; name a modality or a record field")


def known_classes(cfg: RunConfig) -> dict[str, list[str]]:
    """Class vocabularies that the data source fixes (easy-VQA's answers), for tasks that leave them out."""
    if cfg.data.source != "easy_vqa":
        return {}
    from mmfuse.data.easy_vqa import EASY_VQA_TASKS

    return {n: list(EASY_VQA_TASKS[n]["classes"]) for n in cfg.tasks if n in EASY_VQA_TASKS}


def fit_config(
    cfg: RunConfig, encoders: Mapping[str, Encoder], train: Sequence[Record]
) -> tuple[RunConfig, dict[str, Encoder]]:
    """Learn what the config leaves to the training split: each encoder's `fit` and each task kind's `fit`.

    Returns the resolved config (the learned options written in, so it alone rebuilds the model) and the
    encoders, rebuilt where `fit` learned options.
    """
    data = cfg.model_dump(mode="json")
    encoders = dict(encoders)
    for m, enc in encoders.items():
        try:
            learned = enc.fit([r.inputs[m] for r in train if r.inputs.get(m) is not None])
        except ValueError as err:  # e.g. a table column without any value in the training split
            raise ConfigError(f"model.encoders.{m}: {one_line(err)}") from None
        if learned:
            data["model"]["encoders"][m].update(learned)
            comp = EncoderConfig.model_validate(data["model"]["encoders"][m])
            encoders[m] = build_encoder(m, comp)
            log.info("%s encoder: fitted %s on %d training records", m, ", ".join(learned), len(train))
    fixed = known_classes(cfg)
    for name, tc in cfg.tasks.items():
        options = {"classes": tc.classes if tc.classes is not None else fixed.get(name), **tc.options}
        labels = [r.labels[name] for r in train if r.labels.get(name) is not None]
        learned = TASK_KINDS.get(tc.kind).fit(labels, options)
        if options["classes"] is not None and tc.classes is None:
            learned = {"classes": options["classes"], **learned}
        if "classes" in learned and not learned["classes"]:
            raise ConfigError(f"tasks.{name}: no labels for it in the training records; set tasks.{name}.classes")
        data["tasks"][name].update(learned)
    return parse_config(data), encoders


@dataclass
class RunData:
    """Everything the data side of a run needs, built from the config."""

    cfg: RunConfig  # resolved: learned classes and encoder options written in
    encoders: dict[str, Encoder]
    splits: dict[str, list[Record]]
    warnings: list[str]


def build_run_data(
    cfg: RunConfig, encoders: Mapping[str, Encoder] | None = None, errors: list[tuple[str, str]] | None = None
) -> RunData:
    """Read the records through the encoders, fit encoders and tasks on the training split, look for leaks."""
    if cfg.data.source == "shards":  # a shard set: the manifest holds what the fit learned (mmfuse.pack)
        from mmfuse.pack import shard_run_data

        return shard_run_data(cfg, encoders)
    encoders = dict(encoders) if encoders is not None else build_encoders(cfg.model)
    splits = load_splits(cfg, build_schema(cfg, encoders), errors)
    cfg, encoders = fit_config(cfg, encoders, splits.get("train", []))
    leak_modalities = [m for m, e in encoders.items() if e.groups_records or m == cfg.data.group_by]
    warnings = shared_inputs(splits, leak_modalities)
    for note in warnings:
        log.warning("data: %s", note)
    return RunData(cfg, encoders, splits, warnings)


def build_data_model(data: RunData) -> MultiTaskModel:
    """The model of fitted run data: its config's model over its (fitted) encoders, with its tasks."""
    return build_model_from(data.cfg.model, build_tasks(data.cfg.tasks), data.encoders)


@dataclass
class LoaderOptions:
    """Plain batching and caching options for `mmfuse.train.data`."""

    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int | None = None
    bucket_by_length: bool = True
    group_batches: bool = False
    skip_bad: bool = False
    cache: bool = True
    cache_dir: str | None = None
    seed: int = 0
    # optimiser steps per Lightning training step of an all-cached training split (`CachedBatches`); None: auto
    steps_per_call: int | None = None


def loader_options(cfg: RunConfig) -> LoaderOptions:
    d: DataConfig = cfg.data
    return LoaderOptions(
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        bucket_by_length=d.bucket_by_length,
        group_batches=d.group_batches,
        skip_bad=d.skip_bad,
        cache=cfg.train.cache,
        cache_dir=cfg.train.cache_dir,
        seed=cfg.seed,
        steps_per_call=steps_per_call_of(cfg.train),
    )


def steps_per_call_of(t: TrainConfig) -> int | None:
    """`train.steps_per_call` as `LoaderOptions` holds it: a count, or None for auto (1 with step checkpoints)."""
    if t.steps_per_call == "auto":
        return 1 if t.checkpoint_every_n_steps else None
    return int(t.steps_per_call)


@dataclass
class OptimOptions:
    """Plain optimiser and lr-schedule options: the keyword arguments of `mmfuse.train.module.MMFuseModule`."""

    lr: float = 1e-3
    encoder_lr: float = 1e-5
    layer_decay: float = 1.0
    weight_decay: float = 0.01
    scheduler: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    seed: int = 0
    optimizer: str = "adamw"
    momentum: float = 0.9


# The `train.*` keys that are also the Lightning Trainer's own arguments, passed through as they are.
TRAINER_KEYS = (
    "max_epochs",
    "accelerator",
    "devices",
    "strategy",
    "num_nodes",
    "precision",
    "deterministic",
    "log_every_n_steps",
)


@dataclass
class TrainOptions:
    """Plain options of a training run for `mmfuse.train.run`: the Lightning Trainer's, checkpoints, model
    selection (`monitor`: None picks the first task's default metric), the optimiser's (`optim`).

    `trainer_arguments()`: the Lightning Trainer's own arguments among them (`TRAINER_KEYS`)."""

    optim: OptimOptions
    seed: int = 0
    max_epochs: int = 10
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    deterministic: bool = True
    log_every_n_steps: int = 20
    progress_bar: bool = True
    checkpoint_every_n_steps: int | None = None
    monitor: str | None = None
    compile: bool = False
    early_stopping_patience: int | None = None  # None: no early stopping
    early_stopping_min_delta: float = 0.0
    time_limit: float | None = None  # seconds of this session's fit

    def trainer_arguments(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TRAINER_KEYS}


def train_options(cfg: RunConfig) -> TrainOptions:
    t = cfg.train
    optim = OptimOptions(
        lr=t.lr,
        encoder_lr=t.encoder_lr,
        layer_decay=t.layer_decay,
        weight_decay=t.weight_decay,
        scheduler=t.scheduler,
        warmup_steps=t.warmup_steps,
        grad_clip=t.grad_clip,
        seed=cfg.seed,
        optimizer=t.optimizer,
        momentum=t.momentum,
    )
    return TrainOptions(
        optim=optim,
        seed=cfg.seed,
        **{k: getattr(t, k) for k in TRAINER_KEYS},
        progress_bar=t.progress_bar,
        checkpoint_every_n_steps=t.checkpoint_every_n_steps,
        monitor=t.monitor,
        compile=t.compile,
        early_stopping_patience=t.early_stopping.patience if t.early_stopping else None,
        early_stopping_min_delta=t.early_stopping.min_delta if t.early_stopping else 0.0,
        time_limit=t.time_limit,
    )


@dataclass
class RunSummary:
    """What a run's report says it was (`mmfuse.train.report`): its name and components, by registry name.

    `encoders` is {modality: "<encoder> <model>"}; `balance` is None without a balancer.
    """

    name: str
    encoders: dict[str, str]
    fusion: str
    weighting: str
    balance: str | None = None


def run_summary(cfg: RunConfig) -> RunSummary:
    return RunSummary(
        name=cfg.name,
        encoders={m: f"{c.name} {c.options.get('model', '')}" for m, c in cfg.model.encoders.items()},
        fusion=cfg.model.fusion.name,
        weighting=cfg.train.weighting.name,
        balance=cfg.train.balance.name if cfg.train.balance else None,
    )


def trained_for_missing_inputs(cfg: RunConfig) -> bool:
    """Whether the run's training hid whole modalities (a balancer that drops them), so the model expects
    missing inputs at prediction time."""
    if cfg.train.balance is None:
        return False
    from mmfuse.balance import BALANCERS

    return bool(getattr(BALANCERS.get(cfg.train.balance.name), "drops_modalities", False))


@dataclass(frozen=True)
class RunOutline:
    """What the commands around a run ask of its config (the CLI, `serve`, `explain`, `compare`, `bench`): its
    name, seed and epochs, its tasks' kinds ({task: kind}, in the config's order), its task weighting's name and
    its fusion (the component as configured: a comparison's members start from its options)."""

    name: str
    seed: int
    max_epochs: int
    tasks: dict[str, str]
    weighting: str
    fusion: Component


def run_outline(cfg: RunConfig) -> RunOutline:
    return RunOutline(
        name=cfg.name,
        seed=cfg.seed,
        max_epochs=cfg.train.max_epochs,
        tasks={n: tc.kind for n, tc in cfg.tasks.items()},
        weighting=cfg.train.weighting.name,
        fusion=cfg.model.fusion,
    )


# ---------------------------------------------------------------------- training components
def build_weighting(comp: Component, tasks: Mapping[str, Task]) -> Any:
    """The task weighting; per-task `weight`s from the config turn `equal` into `static`."""
    from mmfuse.mtl import WEIGHTINGS

    opts = component_options(WEIGHTINGS, comp, "train.weighting")
    task_names = list(tasks)
    weights = {n: t.weight for n, t in tasks.items() if t.weight != 1.0}
    if weights and comp.name == "equal":
        comp, opts = Component(name="static"), {"weights": weights}
    elif weights and comp.name != "static":
        raise ConfigError(f"tasks.*.weight applies to the equal/static weightings, not {comp.name!r}; remove it")
    elif weights:
        opts["weights"] = {**weights, **opts.get("weights", {})}
    try:
        return WEIGHTINGS.get(comp.name)(tasks=list(task_names), **opts)
    except ValueError as err:
        raise ConfigError(f"train.weighting: {err}") from None


def build_balancer(comp: Component | None, model: MultiTaskModel) -> Any:
    if comp is None:
        return None
    from mmfuse.balance import BALANCERS

    opts = component_options(BALANCERS, comp, "train.balance")
    try:
        balancer = BALANCERS.get(comp.name)(modalities=model.modalities, **opts)
        balancer.setup(model)  # may add probe heads: before the optimiser and any checkpoint load
    except ValueError as err:
        raise ConfigError(f"train.balance: {err}") from None
    return balancer


def _no_grid(fusion: str, spatial: Any, grids: Sequence[str]) -> str:
    """Why fusion `fusion` (which reasons over a grid of tokens) cannot run on these encoders, naming the key."""
    if spatial not in (None, "auto"):
        return (
            f"model.fusion.spatial: {fusion} reasons over the grid of tokens of {spatial!r}, but "
            f"model.encoders.{spatial} gives no grid of tokens: set tokens: true on it (torchvision, timm) "
            "or use the conv encoder"
        )
    if grids:
        return f"model.fusion.spatial: {fusion} needs one grid; the encoders giving one are {', '.join(grids)}: name it"
    return (
        f"model.fusion.spatial: {fusion} reasons over a grid of image tokens, but no encoder gives one: "
        "set tokens: true on the image encoder (torchvision, timm) or use the conv encoder"
    )
