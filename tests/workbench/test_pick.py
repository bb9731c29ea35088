"""Which member a comparison picks per task: the metric first, ties within the seeds' spread, then the cost."""

from __future__ import annotations

from typing import Any

from mmfuse.workbench.pick import pick_for_task, pick_markdown, pick_members


def group(label: str, mean: float, std: float | None, params: int, train_s: float = 10.0) -> dict[str, Any]:
    return {
        "label": label,
        "metrics": {"answer": {"accuracy": {"mean": mean, "std": std}}},
        "params": {"trainable": params, "total": params},
        "train_s": {"mean": train_s, "std": None},
    }


def test_a_clear_leader_is_picked_whatever_its_cost() -> None:
    groups = [group("film", 0.80, 0.01, 100), group("relation", 0.95, 0.01, 10_000)]
    p = pick_for_task(groups, "answer", "accuracy", higher_is_better=True)
    assert (p["pick"], p["leader"], p["tied"]) == ("relation", "relation", [])
    assert "ahead of the next (film, 0.8000) by more than the seeds' spread" in p["why"]


def test_within_the_seed_spread_the_cheapest_is_picked() -> None:
    # gap 0.004 <= max(0.005, 0.002): tied; gated has fewer trainable parameters
    groups = [group("film", 0.950, 0.005, 5_000), group("gated", 0.946, 0.002, 1_000), group("sum", 0.90, 0.001, 10)]
    p = pick_for_task(groups, "answer", "accuracy", higher_is_better=True)
    assert (p["pick"], p["leader"], p["tied"]) == ("gated", "film", ["gated"])
    assert "gated is the cheapest of these (1,000 trainable parameters, 10 s to train)" in p["why"]


def test_lower_is_better_and_one_seed_is_said() -> None:
    groups = [group("a", 0.30, None, 10), group("b", 0.20, None, 1_000)]
    p = pick_for_task(groups, "answer", "accuracy", higher_is_better=False)
    assert (p["pick"], p["tied"]) == ("b", [])  # one seed: no noise estimate, so nothing is tied
    assert "one seed" in p["why"]


def test_nan_metrics_are_left_out_and_every_task_gets_a_line() -> None:
    groups = [group("a", float("nan"), None, 10), group("b", 0.5, 0.1, 10)]
    result = {"groups": groups, "tasks": {"answer": {"metric": "accuracy", "higher_is_better": True}}}
    picks = pick_members(result)
    assert picks["answer"]["pick"] == "b"
    lines = pick_markdown(picks)
    assert lines[0] == "## Which to pick" and lines[2].startswith("- **answer**: `b`: best mean accuracy 0.5000")
