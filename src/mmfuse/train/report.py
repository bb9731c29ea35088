"""The human report of a run: `report.md` with the per-task table, timings, skipped records and plots."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from mmfuse.builders import RunSummary
from mmfuse.io import atomic_write_text

log = logging.getLogger(__name__)


def metrics_table(metrics: dict[str, dict[str, dict[str, float]]], split: str) -> list[str]:
    """Markdown rows of one split's {task: {metric: value}}."""
    per_task = metrics.get(split, {})
    if not per_task:
        return []
    names = sorted({m for t in per_task.values() for m in t})
    rows = [f"| task | {' | '.join(names)} |", f"|---|{'---|' * len(names)}"]
    for task, vals in per_task.items():
        rows.append(f"| {task} | " + " | ".join(f"{vals[m]:.4f}" if m in vals else "" for m in names) + " |")
    return rows


def read_epoch_log(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(epoch, value), ...]} from the CSV log (epoch-level rows only)."""
    path = run_dir / "logs" / "metrics.csv"
    series: dict[str, dict[int, float]] = {}
    if not path.exists():
        return {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and (key.startswith("val/") or key.startswith("balance/")) and row.get("epoch"):
                    series.setdefault(key, {})[int(float(row["epoch"]))] = float(value)  # one value per epoch
    return {k: sorted(v.items()) for k, v in series.items()}


def balance_table(series: dict[str, list[tuple[int, float]]]) -> list[str]:
    """Per epoch and modality: unimodal validation accuracy and the balancer's logged values (coefficients...)."""
    keys = sorted(k for k in series if k.startswith("val/unimodal/") or k.startswith("balance/"))
    if not keys:
        return []
    epochs = sorted({e for k in keys for e, _ in series[k]})
    short = [k.removeprefix("val/unimodal/").removeprefix("balance/") for k in keys]
    rows = ["## modality balance per epoch", "", f"| epoch | {' | '.join(short)} |", f"|---|{'---|' * len(keys)}"]
    for e in epochs:
        vals = [dict(series[k]).get(e) for k in keys]
        rows.append(f"| {e} | " + " | ".join("" if v is None else f"{v:.4f}" for v in vals) + " |")
    return [*rows, ""]


def plot_curves(run_dir: Path, series: dict[str, list[tuple[int, float]]]) -> str | None:
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in series if not k.endswith("/loss"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k in keys:
        xs, ys = zip(*series[k])
        axes[0].plot(xs, ys, marker="o", label=k)
    if "val/loss" in series:
        xs, ys = zip(*series["val/loss"])
        axes[1].plot(xs, ys, marker="o", label="val/loss")
    axes[0].set(title="validation metrics", xlabel="epoch")
    axes[1].set(title="validation loss", xlabel="epoch")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    name = "curves.png"
    fig.savefig(run_dir / name, dpi=100)
    plt.close(fig)
    return name


def _selection_line(summary: dict[str, Any]) -> str:
    if summary["monitor"] is None:
        return (
            f"- epochs: {summary['epochs']}; **warning: no validation records, so no model selection**: "
            f"the weights are the last epoch's ({summary['best_checkpoint']})"
        )
    return f"- epochs: {summary['epochs']}, best checkpoint by `{summary['monitor']}`: {summary['best_checkpoint']}"


def write_report(run_dir: Path, about: RunSummary, summary: dict[str, Any], bad: list[tuple[str, str]]) -> None:
    """Write `run_dir/report.md`: `about` the run (`mmfuse.builders.run_summary`), `summary` its metrics.json."""
    lines = [f"# mmfuse run: {about.name}", ""]
    enc = ", ".join(f"{m}: {e}" for m, e in about.encoders.items())
    lines += [f"- encoders: {enc}", f"- fusion: {about.fusion}", f"- weighting: {about.weighting}"]
    if about.balance:
        lines.append(f"- balance: {about.balance}")
    lines += [
        f"- records: {summary['records']}, skipped as bad: {summary['bad_records']}",
        _selection_line(summary),
        *([f"- stopped: {summary['stop_reason']}"] if summary.get("stop_reason") else []),
        f"- device: {summary['device']} x {summary['world_size']}, precision {summary.get('precision', '32-true')}",
        "- time (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()),
        *[f"- warning: {w}" for w in summary.get("warnings", [])],
        "",
    ]
    for split in ("test", "val"):
        rows = metrics_table(summary["metrics"], split)
        if rows:
            lines += [f"## {split} metrics (best checkpoint)", "", *rows, ""]
    try:
        plot = plot_curves(run_dir, read_epoch_log(run_dir))
    except Exception as err:  # a report without a plot beats no report
        log.warning("could not draw the curves: %s", err)
        plot = None
    if plot:
        lines += ["## curves", "", f"![curves]({plot})", ""]
    lines += balance_table(read_epoch_log(run_dir))
    if bad:
        lines += [f"## skipped records ({len(bad)})", "", *[f"- {s}: {r}" for s, r in bad[:200]], ""]
        if len(bad) > 200:
            lines.append(f"- ... {len(bad) - 200} more in bad_records.txt")
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
