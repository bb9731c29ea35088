"""MultiBench's robustness summary figures (Liang et al. 2021, "MultiBench: Multiscale Benchmarks for Multimodal
Representation Learning", NeurIPS Datasets and Benchmarks track), computed from metric-vs-severity curves.

The paper reports two figures per method and imperfection: relative robustness, which measures the performance
under imperfections directly, and effective robustness, which measures how fast performance drops as the
imperfection grows, compared with a baseline (late fusion there), after Taori et al. 2020. The formulas are
those of the paper's code, `eval_scripts/robustness.py` of github.com/pliang279/MultiBench:

    relative_robustness_helper:  area = sum_i (f[i] + f[i+1]) * 0.1 / 2            (levels 0, 0.1, 0.2, ...)
    effective_robustness_helper: beta_f = lf + (f[0] - lf[0]);  sum(f - beta_f)      (lf: late fusion's curve)
    maxmin_normalize:            (x - min) / (max - min) over the methods compared  (negated first for MSE tasks)

With f(s) the metric at severity s (f(0) clean) and b(s) the baseline's curve on the same grid s_0 < ... < s_n,
this module computes, per method:

    relative_robustness            = sum_i (f(s_i) + f(s_i+1)) / 2 * (s_i+1 - s_i)     the trapezoidal area (the
                                     helper above with the grid's own spacing instead of 0.1)
    effective_robustness           = sum_i [f(s_i) - (b(s_i) + f(s_0) - b(s_0))]
                                   = sum_i [(f(s_i) - f(s_0)) - (b(s_i) - b(s_0))]       0 for the baseline itself
    *_normalized                   = maxmin_normalize over the methods given (1: the most robust, 0: the least;
                                     a lower-is-better metric is negated first); None for fewer than two methods
                                     or when all are equal
    retained                       = relative_robustness / (f(s_0) * (s_n - s_0))        the area relative to a
                                     curve that keeps its clean value (1: no loss); mmfuse's addition, not the
                                     paper's

The baseline curve is used as it is, as in the paper's code (Taori et al. fit a line through many models'
clean and shifted accuracies instead; with a handful of fusions a fit is not meaningful).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Curve = Sequence[tuple[float, float]]  # (severity, metric value) pairs
DEFAULT_BASELINE = "concat"  # MultiBench's baseline is late fusion: unimodal representations concatenated


def area(curve: Curve) -> float:
    """Trapezoidal area under a (severity, value) curve, in value x severity units."""
    pts = sorted(curve)
    return sum((v0 + v1) / 2 * (s1 - s0) for (s0, v0), (s1, v1) in zip(pts, pts[1:]))


def effective(curve: Curve, baseline: Curve) -> float:
    """sum_i [f(s_i) - (b(s_i) + f(s_0) - b(s_0))] over the shared severity grid."""
    f, b = sorted(curve), sorted(baseline)
    if [s for s, _ in f] != [s for s, _ in b]:
        raise ValueError("effective robustness needs the method's and the baseline's curves on the same severities")
    shift = f[0][1] - b[0][1]
    return sum(fv - (bv + shift) for (_, fv), (_, bv) in zip(f, b))


def maxmin(values: Mapping[str, float], higher_is_better: bool = True) -> dict[str, float | None]:
    """MultiBench's `maxmin_normalize` of one figure over methods; None when it cannot rank (< 2, all equal)."""
    signed = {k: (v if higher_is_better else -v) for k, v in values.items()}
    low, high = min(signed.values(), default=0.0), max(signed.values(), default=0.0)
    if len(signed) < 2 or high == low:
        return {k: None for k in signed}
    return {k: (v - low) / (high - low) for k, v in signed.items()}


def curve_figures(
    curves: Mapping[str, Curve], baseline: str | None = None, higher_is_better: bool = True
) -> dict[str, dict[str, float | None]]:
    """The figures of each method's curve of one metric under one imperfection (see the module docstring).

    Args:
        curves: {method: [(severity, value), ...]}, each with the clean value at the lowest severity (0).
        baseline: the method effective robustness is measured against; default `concat` when present, else the
            first method.
        higher_is_better: the metric's direction (orients the normalised figures).
    """
    if not curves:
        return {}
    base = (
        baseline if baseline is not None else (DEFAULT_BASELINE if DEFAULT_BASELINE in curves else next(iter(curves)))
    )
    if base not in curves:
        raise ValueError(f"baseline {base!r} is not one of the methods ({', '.join(curves)})")
    out: dict[str, dict[str, float | None]] = {}
    for name, curve in curves.items():
        pts = sorted(curve)
        span, clean, auc = pts[-1][0] - pts[0][0], pts[0][1], area(pts)
        out[name] = {
            "relative_robustness": auc,
            "effective_robustness": effective(pts, curves[base]),
            "retained": auc / (clean * span) if clean and span else None,
        }
    for figure in ("relative_robustness", "effective_robustness"):
        normalized = maxmin({n: float(f[figure]) for n, f in out.items()}, higher_is_better)
        for name, value in normalized.items():
            out[name][f"{figure}_normalized"] = value
    return out


def sweep_curves(result: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, list[tuple[float, float]]]]:
    """A `sweep` result -> {(modality, kind): {"<task>/<metric>": [(severity, value), ...]}} with the clean value
    at severity 0 added where the grid lacks it."""
    curves: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = {}
    for c in result["conditions"]:
        per_metric = curves.setdefault((c["modality"], c["kind"]), {})
        for metric, value in c["metrics"].items():
            per_metric.setdefault(metric, []).append((float(c["severity"]), float(value)))
    for per_metric in curves.values():
        for metric, pts in per_metric.items():
            if all(s != 0 for s, _ in pts) and metric in result["clean"]:
                pts.append((0.0, float(result["clean"][metric])))
            pts.sort()
    return curves


def robustness(curves: Mapping[str, Any], baseline: str | None = None) -> dict:
    """MultiBench's relative and effective robustness of several methods (e.g. the fusions of a comparison).

    Args:
        curves: {method: `sweep` result} (or one `sweep` result, named "run"), or {method: [(severity, value)]}.
        baseline: the method effective robustness is measured against (default `concat` if present, else the
            first method), as late fusion is in MultiBench.

    Returns:
        For sweep results: {method: {"<modality>/<kind>": {"<task>/<metric>": figures}}}; for plain curves:
        {method: figures}. `figures` holds relative_robustness, effective_robustness, their *_normalized
        forms and retained (see the module docstring for each formula).
    """
    if "conditions" in curves:  # one sweep result
        curves = {"run": curves}
    if not curves:
        return {}
    if not all(isinstance(v, Mapping) and "conditions" in v for v in curves.values()):
        return curve_figures(curves, baseline)
    per_method = {name: sweep_curves(result) for name, result in curves.items()}
    direction: dict[str, bool] = {}
    for result in curves.values():
        direction.update(result.get("higher_is_better", {}))
    out: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {name: {} for name in curves}
    keys = dict.fromkeys(k for c in per_method.values() for k in c)
    for modality, kind in keys:
        metrics = dict.fromkeys(m for c in per_method.values() for m in c.get((modality, kind), {}))
        for metric in metrics:
            group = {
                n: c[(modality, kind)][metric] for n, c in per_method.items() if metric in c.get((modality, kind), {})
            }
            base = baseline if baseline in group else None
            if baseline is not None and base is None:
                continue  # no baseline curve for this metric: nothing to compare against
            figures = curve_figures(group, base, direction.get(metric, True))
            for name, fig in figures.items():
                out[name].setdefault(f"{modality}/{kind}", {})[metric] = fig
    return out
