"""Steps shared by the commands that train many runs and summarise them over seeds (`bench`, `compare`).

- `train_or_reuse`: a run folder that already holds a finished run of the same config is read back, an
  interrupted one resumed from its last checkpoint, anything else trained; a folder of another config is refused.
- `scoring_split`: which split's metrics a run is reported on (test, else val).
- `primary_metrics`: each task's primary metric and its direction.
- `seed_stats` / `fmt_stats`: mean and sample std over seeds, and their `mean ± std` text.

Lightning is imported only when a run is actually trained, so planning and reporting stay light.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from mmfuse.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


def config_agrees(saved: Any, wanted: Any) -> bool:
    """Whether a resolved config (dumped) holds every value `wanted` sets; what training learned may be extra
    (encoder options it fitted, task classes `wanted` leaves as None)."""
    if isinstance(wanted, dict):
        return isinstance(saved, dict) and all(
            (k == "classes" and v is None) or (k in saved and config_agrees(saved[k], v)) for k, v in wanted.items()
        )
    return saved == wanted


def train_or_reuse(cfg: RunConfig, run_dir: Path) -> tuple[dict[str, Any], str]:
    """Train `cfg` into `run_dir` unless it is there already.

    Returns:
        (the run's summary, as `mmfuse.train.run.train` returns and `metrics.json` holds; how it was got:
        "trained", "resumed" (from `checkpoints/last.ckpt`) or "reused" (finished before, never retrained)).

    Raises:
        ConfigError: the folder holds a run of another config, or its `metrics.json` is not valid JSON.
    """
    resume = False
    if (run_dir / "config.yaml").exists():
        from mmfuse.config import load_config

        saved = load_config(run_dir / "config.yaml").model_dump(mode="json")
        if not config_agrees(saved, cfg.model_dump(mode="json")):
            raise ConfigError(f"{run_dir}: holds a run of another config; use another --out or delete that folder")
        metrics = run_dir / "metrics.json"
        if metrics.exists():
            log.info("reusing the finished run in %s", run_dir)
            try:
                return json.loads(metrics.read_text()), "reused"
            except ValueError:
                raise ConfigError(f"{metrics}: not valid JSON; delete it to evaluate the run again") from None
        resume = (run_dir / "checkpoints" / "last.ckpt").exists()
    from mmfuse.train import run as train_run  # Lightning: only when something trains

    return train_run.train(cfg, run_dir, resume=resume), "resumed" if resume else "trained"


def scoring_split(summary: dict[str, Any], run_dir: Path) -> str:
    """The split a run is reported on: "test" when it was scored on one, else "val".

    Raises:
        ConfigError: the run was scored on neither (no validation or test records).
    """
    if not summary.get("metrics"):
        raise ConfigError(f"{run_dir}: no validation or test records to score it; set data.val_fraction")
    return "test" if "test" in summary["metrics"] else "val"


def primary_metrics(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """{task: {"metric": its primary metric, "higher_is_better": bool}} from a resolved config."""
    from mmfuse.builders import build_tasks

    tasks = build_tasks(cfg.tasks)
    return {
        n: {"metric": t.default_metric, "higher_is_better": bool(t.metrics()[t.default_metric].higher_is_better)}
        for n, t in tasks.items()
    }


def seed_stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (None for one value) and the values themselves (one per seed)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "per_seed": values,
    }


def fmt_stats(stats: dict[str, Any], digits: int = 4, signed: bool = False) -> str:
    """`seed_stats` as text: "mean ± std", "mean" for one seed, "n/a" for a NaN mean; `signed`: "+0.50"."""
    mean, std = stats["mean"], stats["std"]
    if mean != mean:  # NaN
        return "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"
