"""Running a comparison's plan: train (or read back) every member, measure it, optionally stress it, and write
`OUT/compare.json`, `OUT/compare.md` and the plots.

A finished member (its `metrics.json` exists) is read back, an interrupted one resumed from its last checkpoint
(`multirun.train_or_reuse`), so a comparison that stopped is continued by the same command. Measurements and
sweeps are kept under `OUT/measurements/` and `OUT/stress/` and read back while they are newer than the member.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfuse.config import ConfigError, RunConfig
from mmfuse.io import atomic_write_text
from mmfuse.multirun import primary_metrics, scoring_split, train_or_reuse
from mmfuse.workbench.compare_measure import measure_member
from mmfuse.workbench.compare_plan import Member, Plan
from mmfuse.workbench.compare_report import render_markdown, summarise
from mmfuse.workbench.compare_stress import stress_functions, stress_member, summarise_stress


@dataclass
class Progress:
    """What the caller is told after each member (the CLI prints it as one line)."""

    index: int  # 1-based position among the members
    total: int
    member: Member
    status: str  # "trained", "resumed", "reused" (finished before), or "stressed"
    metric: str  # "<task>/<metric>" of the headline ("" for "stressed")
    value: float  # that metric on the scoring split (NaN for "stressed")
    seconds: float  # wall time of this member in this command


def run_compare(
    plan: Plan,
    stress: bool = False,
    stress_limit: int | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Train (or read back) every member, measure it, optionally stress it, and write the outputs.

    Args:
        plan: from `plan_compare`.
        stress: also sweep every member over corrupted and missing inputs.
        stress_limit: records per stress condition (None: the whole split); needs `stress`.
        progress: called once per member (and once per stressed member).

    Returns:
        The result written to `OUT/compare.json`.
    """
    start = time.perf_counter()
    if stress_limit is not None and (not stress or stress_limit < 1):
        raise ConfigError(f"--stress-limit: needs --stress and a count >= 1 (got {stress_limit})")
    sweep_fn = stress_functions()[0] if stress else None  # a missing stress module answers before training
    plan.out.mkdir(parents=True, exist_ok=True)
    rows, tasks = _train_members(plan, progress)
    if sweep_fn is not None:
        _stress_members(plan, rows, sweep_fn, stress_limit, progress)
    result = summarise(plan, rows, tasks)
    if stress:
        result["stress"] = summarise_stress(plan, rows, tasks)
    result["compare_wall_s"] = round(time.perf_counter() - start, 1)
    from mmfuse.workbench.plots import draw_all

    result["plots"] = draw_all(result, plan.out)
    atomic_write_text(plan.out / "compare.json", json.dumps(result, indent=2))
    atomic_write_text(plan.out / "compare.md", render_markdown(result))
    return result


def train_member(member: Member) -> tuple[dict[str, Any], str]:
    """(The run's summary, "trained" / "resumed" / "reused"): a finished member is read back, never retrained."""
    return train_or_reuse(member.cfg, member.run_dir)


def _train_members(
    plan: Plan, progress: Callable[[Progress], None] | None
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Train (or read back) and measure every member: (one row per member, the tasks' primary metrics)."""
    rows: list[dict[str, Any]] = []
    tasks: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(plan.members, 1):
        t0 = time.perf_counter()
        summary, status = train_member(m)
        split = scoring_split(summary, m.run_dir)
        tasks = tasks or primary_metrics(load_resolved(m.run_dir))
        row = member_row(m, summary, status, split)
        row.update(measure_member(m.run_dir, plan.out / "measurements" / f"{m.name}.json"))
        rows.append(row)
        if progress is not None:
            task, spec = next(iter(tasks.items()))
            value = summary["metrics"][split][task][spec["metric"]]
            took = time.perf_counter() - t0
            progress(Progress(i, len(plan.members), m, status, f"{task}/{spec['metric']}", value, took))
    return rows, tasks


def _stress_members(
    plan: Plan,
    rows: list[dict[str, Any]],
    sweep: Callable[..., dict[str, Any]],
    limit: int | None,
    progress: Callable[[Progress], None] | None,
) -> None:
    """Add each member's sweep to its row (`row["stress"]`)."""
    for i, (m, row) in enumerate(zip(plan.members, rows), 1):
        t0 = time.perf_counter()
        cache = plan.out / "stress" / (f"{m.name}.json" if limit is None else f"{m.name}.n{limit}.json")
        row["stress"] = stress_member(sweep, m, row["split"], limit, cache)
        if progress is not None:
            progress(Progress(i, len(plan.members), m, "stressed", "", float("nan"), time.perf_counter() - t0))


def load_resolved(run_dir: Path) -> RunConfig:
    """The member's resolved config (`config.yaml`: task classes and fitted encoder options written in)."""
    from mmfuse.config import load_config

    return load_config(run_dir / "config.yaml")


def member_row(m: Member, summary: dict[str, Any], status: str, split: str) -> dict[str, Any]:
    """A member's row of compare.json (before its measurement and sweep are added): its metrics on `split`,
    its training times (s) and how it was got."""
    timings = summary.get("timings_s", {})
    return {
        "name": m.name,
        "group": m.group,
        "fusion": m.fusion,
        "vary": dict(m.vary),
        "seed": m.seed,
        "run_dir": str(m.run_dir),
        "status": status,
        "split": split,
        "metrics": summary["metrics"][split],
        "train_s": timings.get("fit"),
        "total_s": timings.get("total"),
        "epochs": summary.get("epochs"),
    }
