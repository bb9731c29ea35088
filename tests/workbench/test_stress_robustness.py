"""MultiBench's robustness figures on hand-made curves, the expected values worked out here by hand."""

from __future__ import annotations

import pytest

from mmfuse.workbench.robustness import area, curve_figures, effective, robustness

F = [(0.0, 0.9), (0.5, 0.7), (1.0, 0.4)]  # degrades fast
B = [(0.0, 0.8), (0.5, 0.7), (1.0, 0.6)]  # the baseline
G = [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0)]  # does not degrade


def test_relative_robustness_is_the_trapezoidal_area() -> None:
    # (0.9 + 0.7) / 2 * 0.5 + (0.7 + 0.4) / 2 * 0.5 = 0.4 + 0.275
    assert area(F) == pytest.approx(0.675)
    assert area(list(reversed(F))) == pytest.approx(0.675)  # order of the points does not matter


def test_area_equals_multibench_helper_on_its_own_grid() -> None:
    values = [0.91, 0.9, 0.86, 0.8, 0.77, 0.7, 0.61, 0.55, 0.5, 0.42]  # MultiBench's levels 0, 0.1, ..., 0.9
    multibench = 0.0
    for i in range(len(values) - 1):  # relative_robustness_helper, eval_scripts/robustness.py
        multibench += (values[i] + values[i + 1]) * 0.1 / 2
    assert area([(i / 10, v) for i, v in enumerate(values)]) == pytest.approx(multibench)


def test_effective_robustness_against_the_shifted_baseline() -> None:
    # beta_f = b + (f(0) - b(0)) = [0.9, 0.8, 0.7]; f - beta_f = [0, -0.1, -0.3]
    assert effective(F, B) == pytest.approx(-0.4)
    assert effective(B, B) == 0.0
    # beta_g = b + 0.2 = [1.0, 0.9, 0.8]; g - beta_g = [0, 0.1, 0.2]
    assert effective(G, B) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="same severities"):
        effective(F, [(0.0, 0.8), (1.0, 0.6)])


def test_figures_of_three_methods_with_maxmin_normalisation() -> None:
    out = curve_figures({"f": F, "concat": B, "g": G})  # concat is the default baseline
    assert out["concat"]["effective_robustness"] == 0.0
    assert out["f"]["effective_robustness"] == pytest.approx(-0.4)
    # areas 0.675, 0.7, 1.0 -> (x - 0.675) / 0.325
    assert out["f"]["relative_robustness_normalized"] == pytest.approx(0.0)
    assert out["concat"]["relative_robustness_normalized"] == pytest.approx(0.025 / 0.325)
    assert out["g"]["relative_robustness_normalized"] == pytest.approx(1.0)
    # effective -0.4, 0, 0.3 -> (x + 0.4) / 0.7
    assert out["concat"]["effective_robustness_normalized"] == pytest.approx(0.4 / 0.7)
    # retained: the area over a curve that keeps the clean value: 0.675 / (0.9 * 1)
    assert out["f"]["retained"] == pytest.approx(0.75) and out["g"]["retained"] == pytest.approx(1.0)


def test_baseline_by_name_and_lower_is_better_metrics() -> None:
    out = curve_figures({"f": F, "b": B}, baseline="f")
    assert out["f"]["effective_robustness"] == 0.0 and out["b"]["effective_robustness"] == pytest.approx(0.4)
    errors = {"good": [(0.0, 1.0), (1.0, 1.2)], "bad": [(0.0, 1.0), (1.0, 3.0)]}  # e.g. rmse: lower is better
    out = curve_figures(errors, baseline="good", higher_is_better=False)
    assert out["good"]["relative_robustness_normalized"] == 1.0 and out["bad"]["relative_robustness_normalized"] == 0.0
    single = curve_figures({"only": F})
    assert single["only"]["relative_robustness_normalized"] is None  # nothing to rank against
    with pytest.raises(ValueError, match="baseline 'nope'"):
        curve_figures({"f": F}, baseline="nope")


def sweep_result(curve: list[tuple[float, float]], with_zero: bool) -> dict:
    conditions = [
        {"modality": "image", "kind": "noise", "severity": s, "metrics": {"answer/accuracy": v, "size/rmse": 2 - v}}
        for s, v in curve
        if with_zero or s > 0
    ]
    clean = {"answer/accuracy": curve[0][1], "size/rmse": 2 - curve[0][1]}
    return {"conditions": conditions, "clean": clean, "higher_is_better": {"answer/accuracy": True, "size/rmse": False}}


def test_robustness_of_sweep_results_per_condition_and_metric() -> None:
    out = robustness({"film": sweep_result(F, True), "concat": sweep_result(B, False)})  # concat: clean added at 0
    acc = {m: out[m]["image/noise"]["answer/accuracy"] for m in ("film", "concat")}
    assert acc["film"]["relative_robustness"] == pytest.approx(0.675)
    assert acc["film"]["effective_robustness"] == pytest.approx(-0.4)
    assert acc["concat"]["relative_robustness"] == pytest.approx(0.7)
    assert acc["film"]["relative_robustness_normalized"] == 0.0
    rmse = {m: out[m]["image/noise"]["size/rmse"] for m in ("film", "concat")}
    assert rmse["film"]["relative_robustness"] == pytest.approx(2 - 0.675)  # area of 2 - f over [0, 1]
    assert rmse["film"]["relative_robustness_normalized"] == 0.0  # the larger error area is the less robust
    one = robustness(sweep_result(F, True))
    assert one["run"]["image/noise"]["answer/accuracy"]["effective_robustness"] == 0.0


def test_robustness_of_plain_curves() -> None:
    out = robustness({"f": F, "concat": B})
    assert out["f"]["effective_robustness"] == pytest.approx(-0.4)
