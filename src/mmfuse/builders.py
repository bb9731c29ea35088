"""Builders: turn a validated config into modules, passing flat arguments (torchtune's rule:
configs never intrude into the classes)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mmfuse.config import Component, ConfigError, ModelConfig, RunConfig, TaskConfig, component_options, parse_config
from mmfuse.encoders.base import Encoder
from mmfuse.fusion.base import Fusion
from mmfuse.model import MultiTaskModel
from mmfuse.tasks import MLPHead, Task, build_task


def build_encoder(modality: str, comp: Component) -> Encoder:
    from mmfuse.encoders import ENCODERS

    opts = component_options(ENCODERS, comp, f"model.encoders.{modality}")
    encoder = ENCODERS.get(comp.name)(**opts)
    if encoder.modality and encoder.modality != modality and modality in ("image", "text"):
        raise ConfigError(f"model.encoders.{modality}: encoder {comp.name!r} is a {encoder.modality} encoder")
    return encoder


def build_fusion(comp: Component, input_dims: Mapping[str, int]) -> Fusion:
    from mmfuse.fusion import FUSIONS

    opts = component_options(FUSIONS, comp, "model.fusion")
    try:
        return FUSIONS.get(comp.name)(input_dims=dict(input_dims), **opts)
    except ValueError as err:
        raise ConfigError(f"model.fusion: {err}") from None


def build_tasks(tasks: Mapping[str, TaskConfig], classes: Mapping[str, list[str]] | None = None) -> dict[str, Task]:
    """Tasks from their configs; `classes` fills in class lists the config leaves out."""
    out: dict[str, Task] = {}
    for name, tc in tasks.items():
        opts: dict[str, Any] = {"weight": tc.weight}
        cls = tc.classes if tc.classes is not None else (classes or {}).get(name)
        if tc.kind != "regression":
            if cls is None and tc.kind != "binary":
                raise ConfigError(f"tasks.{name}.classes: required for a {tc.kind} task (or infer them from data)")
            opts["classes"] = cls
        elif tc.loss is not None:
            opts["loss"] = tc.loss
        try:
            out[name] = build_task(name, tc.kind, **opts)
        except ValueError as err:
            raise ConfigError(f"tasks.{name}: {err}") from None
    return out


def build_model_from(model_cfg: ModelConfig, tasks: Mapping[str, Task]) -> MultiTaskModel:
    encoders = {m: build_encoder(m, comp) for m, comp in model_cfg.encoders.items()}
    fusion = build_fusion(model_cfg.fusion, {m: e.output_dim for m, e in encoders.items()})
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
