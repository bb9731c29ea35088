"""PNG plots of a comparison (matplotlib, Agg backend: no display needed).

- `bar_<task>.png`: per task, the primary metric of every setting, mean over seeds with ± std error bars.
- `stress_<modality>_<kind>.png`: per corrupted/missing modality and kind, each task's primary metric
  against severity, one line per setting (mean over seeds) with a ± std band.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def draw_all(result: dict[str, Any], out: Path) -> dict[str, dict[str, str]]:
    """Draw every plot of `result` (compare.json's content) into `out`; {kind: {name: file name}}."""
    plots: dict[str, dict[str, str]] = {"bars": {}}
    for task, spec in result["tasks"].items():
        plots["bars"][task] = bar_chart(result["groups"], task, spec, out / f"bar_{_safe(task)}.png").name
    if "stress" in result:
        plots["stress"] = {}
        for (modality, kind), path in stress_curves(result["stress"], result["tasks"], out).items():
            plots["stress"][f"{modality}/{kind}"] = path.name
    return plots


def bar_chart(groups: list[dict[str, Any]], task: str, spec: dict[str, Any], path: Path) -> Path:
    """One bar per setting: the task's primary metric, mean over seeds, ± std error bars (none for one seed)."""
    plt = _pyplot()
    labels = [g["label"] for g in groups]
    stats = [g["metrics"][task][spec["metric"]] for g in groups]
    means = [s["mean"] for s in stats]
    errs = [s["std"] or 0.0 for s in stats]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 1.5), 3.8))
    ax.bar(range(len(labels)), means, yerr=errs, capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right")
    arrow = "higher is better" if spec["higher_is_better"] else "lower is better"
    ax.set_ylabel(f"{task} {spec['metric']} ({arrow})")
    low, high = min(m - e for m, e in zip(means, errs)), max(m + e for m, e in zip(means, errs))
    pad = 0.1 * (high - low) if high > low else 0.05 * (abs(high) or 1.0)
    ax.set_ylim(low - pad, high + pad)  # zoomed in: settings often differ in the last digits
    zoomed = " (y axis not from 0)" if low - pad > 0 else ""
    ax.set_title(f"{task}: mean ± std over seeds{zoomed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stress_curves(stress: dict[str, Any], tasks: dict[str, Any], out: Path) -> dict[tuple[str, str], Path]:
    """Per (modality, kind): one panel per task, metric against severity, one line (and band) per setting."""
    plt = _pyplot()
    pairs = sorted({(c["modality"], c["kind"]) for g in stress["groups"].values() for c in g["conditions"]})
    files: dict[tuple[str, str], Path] = {}
    for modality, kind in pairs:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
        for ax, (task, spec) in zip(axes[0], tasks.items()):
            key = f"{task}/{spec['metric']}"
            for label, g in stress["groups"].items():
                points = [
                    (c["severity"], c["metrics"][key])
                    for c in g["conditions"]
                    if (c["modality"], c["kind"]) == (modality, kind) and key in c["metrics"]
                ]
                if not points:
                    continue
                xs = [p[0] for p in points]
                ys = [p[1]["mean"] for p in points]
                sd = [p[1]["std"] or 0.0 for p in points]
                ax.plot(xs, ys, marker="o", label=label)
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.2)
            ax.set_xlabel("severity")
            ax.set_ylabel(key)
            ax.set_title(f"{modality}: {kind}")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out / f"stress_{_safe(modality)}_{_safe(kind)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files[(modality, kind)] = path
    return files
