"""Which member of a comparison to pick, per task, and why: metric first, then the seeds' noise, then the cost.

The rule, stated in every report that uses it:

1. The leader is the setting with the best mean of the task's primary metric over seeds.
2. A setting is *tied* with the leader when the gap between their means is within the larger of their two
   sample standard deviations over seeds (with one seed there is no noise estimate: nothing is tied, and the
   report says the ranking rests on one run).
3. The pick is the cheapest of the leader and its ties: fewest trainable parameters, then the shortest training.
   So a larger model is only picked when it is better by more than the seeds disagree.
"""

from __future__ import annotations

from typing import Any


def _has(group: dict[str, Any], task: str, metric: str) -> bool:
    """The group has a finite mean of the metric (NaN and absent ones are left out)."""
    value = group["metrics"].get(task, {}).get(metric, {}).get("mean")
    return value is not None and value == value


def pick_for_task(groups: list[dict[str, Any]], task: str, metric: str, higher_is_better: bool) -> dict[str, Any]:
    """The pick for one task: {pick, leader, tied, why} from the comparison's groups (`compare.summarise`)."""
    scored = [g for g in groups if _has(g, task, metric)]
    if not scored:
        return {"pick": None, "leader": None, "tied": [], "why": f"no setting has {task} {metric}"}
    sign = 1.0 if higher_is_better else -1.0

    def mean(g: dict[str, Any]) -> float:
        return float(g["metrics"][task][metric]["mean"])

    leader = max(scored, key=lambda g: sign * mean(g))
    lead_std = leader["metrics"][task][metric]["std"]
    tied = []
    for g in scored:
        if g is leader:
            continue
        std = g["metrics"][task][metric]["std"]
        noise = None if lead_std is None or std is None else max(lead_std, std)
        if noise is not None and abs(mean(leader) - mean(g)) <= noise:
            tied.append(g)
    pick = min([leader, *tied], key=_cost)
    why = f"best mean {metric} {mean(leader):.4f}"
    if lead_std is None:
        why += " (one seed: no noise estimate, the ranking rests on one run each)"
    elif tied:
        names = ", ".join(f"{g['label']} {mean(g):.4f}" for g in tied)
        why += f"; within the seeds' spread of it: {names}"
        if pick is not leader:
            why += f"; {pick['label']} is the cheapest of these ({_cost_text(pick)}) and is picked"
    else:
        runner = sorted(scored, key=lambda g: -sign * mean(g))[1:2]
        if runner:
            why += f"; ahead of the next ({runner[0]['label']}, {mean(runner[0]):.4f}) by more than the seeds' spread"
    return {
        "pick": pick["label"],
        "leader": leader["label"],
        "tied": [g["label"] for g in tied],
        "why": why,
    }


def _cost(group: dict[str, Any]) -> tuple[float, float]:
    train = group["train_s"]["mean"]
    return float(group["params"]["trainable"]), float(train) if train == train else float("inf")


def _cost_text(group: dict[str, Any]) -> str:
    params, train = _cost(group)
    shown = f"{int(params):,} trainable parameters"
    return shown + (f", {train:.0f} s to train" if train != float("inf") else "")


def pick_members(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: pick_for_task(...)} for every task of a comparison's result."""
    return {
        task: pick_for_task(result["groups"], task, spec["metric"], spec["higher_is_better"])
        for task, spec in result["tasks"].items()
    }


def pick_markdown(picks: dict[str, dict[str, Any]]) -> list[str]:
    """The report's section: one line per task."""
    lines = ["## Which to pick", ""]
    lines += [f"- **{task}**: `{p['pick']}`: {p['why']}." for task, p in picks.items() if p["pick"] is not None]
    lines += [
        "",
        "Rule: the best mean over seeds leads; a setting within the larger seed standard deviation of the leader is "
        "tied with it; of the leader and its ties the one with the fewest trainable parameters (then the shortest "
        "training) is picked.",
        "",
    ]
    return lines
