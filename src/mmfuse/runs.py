"""A finished run directory, loaded without the trainer: its resolved config and its model.

A run directory holds `config.yaml` (resolved: every task's classes and every encoder's fitted options
written in) and `model.safetensors` (the best weights; frozen encoders loaded from files are left out and
rebuilt from the config, checked by their `cache_key`). `predict` and `evaluate` start here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmfuse.builders import build_model_from, build_tasks
from mmfuse.config import ConfigError, RunConfig, load_config
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

    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise ConfigError(f"{run_dir}: pass the run directory (it holds config.yaml and model.safetensors)")
    for name in ("config.yaml", "model.safetensors"):
        if not (run_dir / name).exists():
            raise ConfigError(f"{run_dir}: not a finished run directory ({name} is missing)")
    cfg = load_config(run_dir / "config.yaml")
    model = build_model_from(cfg.model, build_tasks(cfg.tasks))
    with safe_open(str(run_dir / "model.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    rebuilt = [m for m in model.encoders if f"frozen.{m}" in meta]
    for m in rebuilt:
        if meta[f"frozen.{m}"] != model.encoders[m].cache_key():
            raise ConfigError(
                f"{run_dir}/model.safetensors: trained with a different frozen {m} encoder than the config builds"
            )
    state = load_file(str(run_dir / "model.safetensors"))
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
