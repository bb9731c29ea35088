"""A finished run directory, loaded without the trainer: its resolved config and its model.

A run directory holds `config.yaml` (resolved: every task's classes and every encoder's fitted options
written in) and `model.safetensors` (the best weights; frozen encoders loaded from files are left out and
rebuilt from the config, checked by their `cache_key`). `predict` and `evaluate` start here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mmfuse.config import ConfigError, RunConfig, check_run_dir, load_config
from mmfuse.text import one_line

if TYPE_CHECKING:  # the model and its builders import torch: `resume_config` answers without them
    from mmfuse.model import MultiTaskModel


@dataclass
class LoadedRun:
    """A finished run: its directory, resolved config (handed to `mmfuse.builders`, which alone read it) and model
    (in eval mode)."""

    run_dir: Path
    config: RunConfig
    model: MultiTaskModel


def open_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a trained model from a run directory (config.yaml + model.safetensors) alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mmfuse.builders import build_model

    run_dir = check_run_dir(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    model = build_model(cfg)
    weights = run_dir / "model.safetensors"
    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error type (and OSError) for a damaged file
        raise ConfigError(
            f"{weights}: not a readable safetensors file (truncated or corrupt?): {one_line(err, 160)}"
        ) from None
    rebuilt = [m for m in model.encoders if f"frozen.{m}" in meta]
    for m in rebuilt:
        if meta[f"frozen.{m}"] != model.encoders[m].cache_key():
            raise ConfigError(
                f"{run_dir}/model.safetensors: trained with a different frozen {m} encoder than the config builds"
            )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches
        detail = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), one_line(err))
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


# What `train --resume --set KEY=VALUE` may change: how long the run goes on and what it reports, never what or how
# it learns. Each is in effect on resume: the Trainer is built from the resumed config (a longer `max_epochs`
# also stretches the cosine schedule, whose length is computed from it), and the features cache only moves.
RESUME_MAY_CHANGE = frozenset(
    {
        "train.max_epochs",
        "train.progress_bar",
        "train.log_every_n_steps",
        "train.checkpoint_every_n_steps",
        "train.steps_per_call",  # the same steps and results at any count (tests/train/test_steps_per_call.py)
        "train.cache_dir",
        "train.time_limit",  # counts each session's fit time
        "train.early_stopping",  # on or off (null); its counter comes back from the checkpoint
        "train.early_stopping.patience",
        "train.early_stopping.min_delta",
        "data.num_workers",  # the records' order does not depend on it (shards: LitData's elastic resume)
    }
)


def check_resume_changes(saved: RunConfig, cfg: RunConfig) -> None:
    """Refuse a resumed config that differs from the run's saved one outside `RESUME_MAY_CHANGE`.

    The optimiser, its schedule and the model come back from the checkpoint, and the data order from the seed:
    a new lr, optimizer, model, task, data or seed would be written to config.yaml without being in effect.

    Raises:
        ConfigError: one line naming the first key that may not change, its saved value and the one asked for.
    """
    old, new = _leaves(saved.model_dump(mode="json")), _leaves(cfg.model_dump(mode="json"))
    for key in sorted(set(old) | set(new)):
        if old.get(key, _ABSENT) != new.get(key, _ABSENT) and key not in RESUME_MAY_CHANGE:
            was, asked = (_shown(d.get(key, _ABSENT)) for d in (old, new))
            raise ConfigError(f"--resume cannot change {key} (was {was}, asked {asked}): start a new run instead")


def resume_config(run_dir: str | Path, overrides: list[str]) -> RunConfig:
    """The config a resumed run goes on with: its `config.yaml` with `overrides` (`check_resume_changes`)."""
    path = Path(run_dir) / "config.yaml"
    cfg = load_config(path, overrides)
    check_resume_changes(load_config(path), cfg)
    return cfg


_ABSENT = object()


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a.b.c": value} for every non-mapping value of a nested mapping (an empty mapping is a leaf)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shown(value: object) -> str:
    import json

    return "(unset)" if value is _ABSENT else json.dumps(value)[:80]
