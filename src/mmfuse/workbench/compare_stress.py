"""`mmfuse compare --stress`: each member swept over corrupted and missing inputs, and the sweeps summarised
per group over seeds.

The sweep and the robustness figures come from `mmfuse.workbench.stress` (imported only with `--stress`). A
member's sweep is kept in `OUT/stress/<member>[.n<limit>].json` and read back while it is newer than the
member's metrics.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmfuse.config import ConfigError
from mmfuse.io import atomic_write_text
from mmfuse.multirun import seed_stats
from mmfuse.workbench.compare_plan import Member, Plan
from mmfuse.workbench.compare_report import by_group


def stress_functions() -> tuple[Callable[..., dict[str, Any]], Callable[..., dict[str, Any]]]:
    """`sweep` and `robustness` of `mmfuse.workbench.stress` (one ConfigError line when it is not there)."""
    try:
        mod = importlib.import_module("mmfuse.workbench.stress")
    except ImportError as err:
        raise ConfigError(f"--stress needs mmfuse.workbench.stress, which cannot be imported ({err})") from None
    return mod.sweep, mod.robustness


def stress_member(
    sweep: Callable[..., dict[str, Any]], m: Member, split: str, limit: int | None, cache_file: Path
) -> dict[str, Any]:
    """The member's sweep (read back from `cache_file` when it is newer than the member's metrics)."""
    if cache_file.exists() and cache_file.stat().st_mtime >= (m.run_dir / "metrics.json").stat().st_mtime:
        try:
            return json.loads(cache_file.read_text())
        except ValueError:
            pass
    result = sweep(m.run_dir, split=split, seed=m.seed, limit=limit)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache_file, json.dumps(result, indent=2))
    return result


def _flat(d: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as {"a/b": value}."""
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        return {prefix: float(d)}
    if isinstance(d, dict):
        out: dict[str, float] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {}


def summarise_stress(plan: Plan, rows: list[dict[str, Any]], tasks: dict[str, Any]) -> dict[str, Any]:
    """Per group: each condition's metrics and the robustness figures, mean and std over seeds.

    The figures come from `stress.robustness({setting: sweep})` over the settings of one seed (effective
    robustness is relative to a baseline setting: the first `concat` one, as late fusion in MultiBench), then
    each figure's mean and std over seeds.

    Returns:
        {"baseline": its group label or None, "groups": {label: {"conditions": [{modality, kind, severity,
        metrics: {"<task>/<metric>": seed_stats}}], "clean": {...: seed_stats}, "robustness": {...: seed_stats}}}}.
    """
    grouped = by_group(rows)
    baseline = next((label for label, ms in grouped.items() if ms[0]["fusion"] == "concat"), None)
    figures = _figures(grouped, plan.seeds, baseline)
    groups = {
        label: {
            "conditions": _conditions(members),
            "clean": _stats_of([r["stress"]["clean"] for r in members]),
            "robustness": _stats_of(figures[label]),
        }
        for label, members in grouped.items()
    }
    return {"baseline": baseline, "groups": groups}


def _figures(
    grouped: dict[str, list[dict[str, Any]]], seeds: list[int], baseline: str | None
) -> dict[str, list[dict[str, float]]]:
    """{group label: one flat {"<modality>/<kind>/<task>/<metric>/<figure>": value} per seed}."""
    robustness = stress_functions()[1]
    figures: dict[str, list[dict[str, float]]] = {label: [] for label in grouped}
    for seed in seeds:
        sweeps = {label: r["stress"] for label, ms in grouped.items() for r in ms if r["seed"] == seed}
        for label, figs in robustness(sweeps, baseline=baseline).items():
            figures[label].append(_flat(figs))
    return figures


def _conditions(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (modality, kind, severity) of the group's sweeps, its metrics' `seed_stats`, sorted."""
    curves: dict[tuple[str, str, float], list[dict[str, float]]] = {}
    for r in members:
        for c in r["stress"]["conditions"]:
            curves.setdefault((c["modality"], c["kind"], float(c["severity"])), []).append(c["metrics"])
    return [
        {"modality": mod, "kind": kind, "severity": sev, "metrics": _stats_of(ms)}
        for (mod, kind, sev), ms in sorted(curves.items())
    ]


def _stats_of(dicts: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """`seed_stats` of every key that all the dicts (one per seed) hold."""
    keys = [k for k in dicts[0] if all(k in d for d in dicts)] if dicts else []
    return {k: seed_stats([float(d[k]) for d in dicts]) for k in keys}
