"""A finished run directory, loaded without the trainer: its resolved config and its model.

A run directory holds `config.yaml` (resolved: every task's classes and every encoder's fitted options
written in) and `model.safetensors` (the best weights; frozen encoders loaded from files are left out and
rebuilt from the config, checked by their `cache_key`). `predict` and `evaluate` start here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmfuse.builders import build_model_from, build_tasks
from mmfuse.config import ConfigError, RunConfig, check_run_dir, load_config
from mmfuse.model import MultiTaskModel


@dataclass
class LoadedRun:
    """A finished run: its directory, resolved config and model (in eval mode)."""

    run_dir: Path
    config: RunConfig
    model: MultiTaskModel


def open_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a trained model from a run directory (config.yaml + model.safetensors) alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    run_dir = check_run_dir(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    model = build_model_from(cfg.model, build_tasks(cfg.tasks))
    weights = run_dir / "model.safetensors"
    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error type (and OSError) for a damaged file
        shown = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{weights}: not a readable safetensors file (truncated or corrupt?): {shown}") from None
    rebuilt = [m for m in model.encoders if f"frozen.{m}" in meta]
    for m in rebuilt:
        if meta[f"frozen.{m}"] != model.encoders[m].cache_key():
            raise ConfigError(
                f"{run_dir}/model.safetensors: trained with a different frozen {m} encoder than the config builds"
            )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches
        detail = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), str(err).splitlines()[0])
        raise ConfigError(f"{run_dir}/model.safetensors does not match config.yaml: {detail}") from None
    missing = [k for k in missing if not k.startswith(tuple(f"encoders.{m}." for m in rebuilt))]
    if missing or unexpected:
        raise ConfigError(
            f"{run_dir}/model.safetensors does not match config.yaml "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return LoadedRun(run_dir, cfg, model.eval())


def load_run(run_dir: str | Path) -> MultiTaskModel:
    """The trained model of a run directory (see `open_run`)."""
    return open_run(run_dir).model
