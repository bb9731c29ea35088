"""The picture of one explained prediction (`mmfuse explain`), drawn from `Explanation.report` alone.

Panels, top to bottom: the inputs (each image with the attention over its spatial tokens as a heat map, when the
fusion attends to it, and with lines between the cells of a relation network's heaviest pairs) next to every task's
prediction and top probabilities; each modality's contribution to every task's top logit; the attention over text
tokens as shaded words; the gate values (`gated`); the distributions of FiLM's gamma and beta. Matplotlib's object
API only (no pyplot): safe in a server's threads.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np

Panel = Callable[[Any], None]
TOP = 3
COLORS = ["#4a7bd0", "#d0824a", "#5aa469", "#a45a9b", "#9b8f3a", "#3a8f9b"]


def render(explanation: Any, dpi: int = 80) -> bytes:
    """The PNG bytes of the explanation's picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    report, images = explanation.report, explanation.images
    rows = _rows(report, images)
    heights = [h for h, _ in rows]
    fig = Figure(figsize=(10, sum(heights)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), 2, height_ratios=heights)
    for r, (_, panels) in enumerate(rows):
        if len(panels) == 1:
            panels[0](fig.add_subplot(grid[r, :]))
        else:
            for col, panel in enumerate(panels[:2]):
                panel(fig.add_subplot(grid[r, col]))
    fig.suptitle(f"mmfuse explain: fusion {report['fusion']}", fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _rows(report: dict[str, Any], images: dict[str, Any]) -> list[tuple[float, list[Panel]]]:
    """[(height in inches, [one or two panel functions])] for the report's contents."""
    heat = {a["key"]: a for a in report.get("attention", []) if a.get("grid")}
    words = [a for a in report.get("attention", []) if a.get("tokens")]
    pairs = {report["pairs"]["modality"]: report["pairs"]} if "pairs" in report else {}
    first: list[Panel] = [lambda ax, m=m: _image(ax, m, images[m], heat.get(m), pairs.get(m)) for m in list(images)[:1]]
    first.append(lambda ax: _predictions(ax, report["predictions"], report["inputs"]))
    rows: list[tuple[float, list[Panel]]] = [(3.2, first)]
    for m in list(images)[1:]:
        rows.append((3.2, [lambda ax, m=m: _image(ax, m, images[m], heat.get(m), pairs.get(m))]))
    rows.append((0.6 + 0.45 * len(report["contributions"]), [lambda ax: _contributions(ax, report["contributions"])]))
    for entry in words:
        rows.append((1.1 + 0.35 * (len(entry["tokens"]) // 14), [lambda ax, e=entry: _words(ax, e)]))
    if "gate" in report:
        rows.append((2.2, [lambda ax: _gate_units(ax, report["gate"]), lambda ax: _gate_hist(ax, report["gate"])]))
    if "film" in report:
        film = report["film"]
        rows.append(
            (
                2.2,
                [
                    lambda ax, k=k: _hist(ax, film[k], f"FiLM {k} ({film['condition_on']} -> {film['target']})")
                    for k in ("gamma", "beta")
                ],
            )
        )
    return rows


def _image(
    ax: Any, modality: str, image: Any, attention: dict[str, Any] | None, pairs: dict[str, Any] | None = None
) -> None:
    arr = np.asarray(image)
    ax.imshow(arr)
    title = f"{modality}"
    if attention is not None:
        h, w = attention["grid"]
        weights = np.asarray(attention["weights"], dtype=float).reshape(h, w)
        ax.imshow(
            weights,
            cmap="inferno",
            alpha=0.5,
            extent=(-0.5, arr.shape[1] - 0.5, arr.shape[0] - 0.5, -0.5),
            interpolation="bilinear" if h * w > 4 else "nearest",
        )
        title += f": attention of {attention['query']} over its {h}x{w} tokens"
    if pairs is not None and pairs["top"]:
        ax.imshow(np.full_like(arr, 255), alpha=0.35)  # the image faded, so that the lines stand out
        _pairs(ax, pairs, arr.shape[:2])
        h, w = pairs["grid"]
        title += f": top {len(pairs['top'])} of {pairs['real_pairs']} pairs of its {h}x{w} cells ({pairs['weight']})"
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _pairs(ax: Any, pairs: dict[str, Any], size: tuple[int, int]) -> None:
    """A line between the centres of the two cells of every top pair (a ring for a cell paired with itself), wider
    and more opaque for a heavier pair, numbered by rank at its midpoint."""
    (h, w), (height, width) = pairs["grid"], size
    top = max(p["weight"] for p in pairs["top"]) or 1.0
    for rank, pair in enumerate(pairs["top"], start=1):
        cells = np.asarray(pair["cells"], dtype=float)  # (2, 2): (row, column) of cells i and j
        ys, xs = (cells[:, 0] + 0.5) * height / h - 0.5, (cells[:, 1] + 0.5) * width / w - 0.5  # pixel centres
        strength, color = pair["weight"] / top, COLORS[(rank - 1) % len(COLORS)]
        if pair["i"] == pair["j"]:
            ax.plot(xs[:1], ys[:1], "o", markersize=6 + 10 * strength, markerfacecolor="none", color=color)
        else:
            ax.plot(xs, ys, "-o", linewidth=1.5 + 4 * strength, markersize=5, color=color, alpha=0.6 + 0.4 * strength)
        badge = {"boxstyle": "circle,pad=0.15", "facecolor": color, "edgecolor": "white"}
        at = (0.65 * xs[0] + 0.35 * xs[1], 0.65 * ys[0] + 0.35 * ys[1])  # a third of the way from cell i: badges part
        ax.annotate(str(rank), at, fontsize=7, color="white", ha="center", va="center", bbox=badge)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)


def _predictions(ax: Any, predictions: dict[str, Any], inputs: dict[str, Any]) -> None:
    lines = []
    for m, given in inputs.items():
        if given["kind"] != "image":  # a text is shown; other inputs (perhaps files) only as given or absent
            value = "(absent)" if given["value"] is None else "(given)"
            value = repr(given["value"]) if given["kind"] == "text" and given["value"] is not None else value
            lines.append(textwrap.shorten(f"{m}: {value}", 60))
    if lines:
        lines.append("")
    for task, pred in predictions.items():
        lines.append(f"{task} ({pred['kind']}): {_answer(pred)}")
        probs = sorted((pred.get("probabilities") or {}).items(), key=lambda kv: -kv[1])[:TOP]
        if probs:
            lines.append("    " + ", ".join(f"{c} {p:.3f}" for c, p in probs))
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace", transform=ax.transAxes)
    ax.set_title("predictions (top probabilities)", fontsize=9)
    ax.axis("off")


def _answer(pred: dict[str, Any]) -> str:
    if "label" in pred:
        return str(pred["label"])
    if "labels" in pred:
        return ", ".join(pred["labels"]) or "(none)"
    if "value" in pred:
        return f"{float(pred['value']):.4f}"
    return "?"


def _contributions(ax: Any, contributions: dict[str, Any]) -> None:
    tasks = list(contributions)
    modalities = list(next(iter(contributions.values()))["modalities"]) if tasks else []
    names = [*modalities, "baseline"]
    height = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [c["modalities"][name] if name != "baseline" else c["baseline"] for c in contributions.values()]
        ys = np.arange(len(tasks)) + (i - (len(names) - 1) / 2) * height
        ax.barh(
            ys, values, height=height, color=COLORS[i % len(COLORS)] if name != "baseline" else "#bbbbbb", label=name
        )
    ax.axvline(0, color="#444", linewidth=0.8)
    labels = [f"{t}: {c['output']}" + (" *" if c.get("note") else "") for t, c in contributions.items()]
    ax.set_yticks(np.arange(len(tasks)), labels, fontsize=8)
    ax.invert_yaxis()
    method = ", ".join(sorted({c["method"] for c in contributions.values()}))
    ax.set_title(f"contribution of each modality to each task's top logit ({method})", fontsize=9)
    noted = [c for c in contributions.values() if c.get("note")]
    if noted:  # a task whose integrated gradients do not add up says so on the picture, not only in the JSON
        replaced = any(c["method"] == "feature_ablation" for c in noted)
        what = "feature ablation shown instead" if replaced else "read them with care"
        note = f"* integrated gradients did not add up to the logit (error > 5%): {what}; see the JSON"
        ax.set_xlabel(note, fontsize=7)
    ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(axis="x", labelsize=8)


def _words(ax: Any, entry: dict[str, Any]) -> None:
    """The key tokens as words shaded by their attention weight (darker: more)."""
    from matplotlib import colormaps

    cmap = colormaps["Oranges"]
    weights = np.asarray(entry["weights"], dtype=float)
    top = weights.max() if weights.size and weights.max() > 0 else 1.0
    real = entry.get("real") or [True] * len(weights)
    x, y, per_line = 0.0, 0.8, 1.0
    for token, weight, is_real in zip(entry["tokens"], weights, real):
        if not is_real:
            continue
        width = 0.012 * (len(token) + 1.5)
        if x + width > per_line:
            x, y = 0.0, y - 0.35
        ax.text(
            x,
            y,
            token,
            fontsize=9,
            family="monospace",
            va="center",
            ha="left",
            transform=ax.transAxes,
            bbox={"facecolor": cmap(0.85 * weight / top), "edgecolor": "none", "pad": 1.5},
        )
        x += width
    ax.set_title(f"attention of {entry['query']} over the {entry['key']} tokens (max {top:.3f})", fontsize=9)
    ax.axis("off")


def _gate_units(ax: Any, gate: dict[str, Any]) -> None:
    values = np.asarray(gate["values"], dtype=float)
    ax.bar(np.arange(len(values)), values, width=1.0, color=COLORS[0])
    ax.axhline(gate["mean"], color="#a00", linewidth=1, label=f"mean {gate['mean']:.3f}")
    ax.set_ylim(0, 1)
    ax.set_title(f"gate per unit (sigmoid of {gate['gate_on']}, gating {gate['gated']})", fontsize=9)
    ax.set_xlabel("unit", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=8)


def _gate_hist(ax: Any, gate: dict[str, Any]) -> None:
    _hist(ax, gate, f"gate values ({100 * gate['open_fraction']:.0f}% > 0.5)")


def _hist(ax: Any, stats: dict[str, Any], title: str) -> None:
    edges = np.asarray(stats["histogram"]["edges"], dtype=float)
    counts = np.asarray(stats["histogram"]["counts"], dtype=float)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=COLORS[1], edgecolor="white")
    ax.set_title(
        f"{title}\nmean {stats['mean']:.3f}, std {stats['std']:.3f}, min {stats['min']:.3f}, max {stats['max']:.3f}",
        fontsize=9,
    )
    ax.tick_params(labelsize=8)
