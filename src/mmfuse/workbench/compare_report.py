"""The outputs of `mmfuse compare`: the JSON summary (`summarise`) and the Markdown report (`render_markdown`).

Units: metrics as the tasks report them; `train_s` in seconds (each member's `fit` time); `latency_ms` in
milliseconds per forward of one batch, keyed by batch size ("1", "64"). Every aggregate is `seed_stats`
(mean, sample std, per-seed values) over the seeds of one setting (a *group*).
"""

from __future__ import annotations

import time
from typing import Any

from mmfuse.builders import run_outline
from mmfuse.multirun import fmt_stats, seed_stats
from mmfuse.workbench.compare_measure import LATENCY_BATCHES
from mmfuse.workbench.compare_plan import Plan
from mmfuse.workbench.pick import pick_markdown, pick_members


def by_group(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Member rows by group label (the seeds of one setting), in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    return groups


def summarise(plan: Plan, rows: list[dict[str, Any]], tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparison's JSON: settings, every member, and per group every metric's mean and std over seeds.

    Args:
        plan: the comparison's plan (its settings are copied in).
        rows: one row per member (`compare_run.member_row` plus `measure_member`'s fields).
        tasks: `multirun.primary_metrics` of the members.
    """
    groups = [_group(label, members) for label, members in by_group(rows).items()]
    splits = sorted({r["split"] for r in rows})
    outline = run_outline(plan.base)
    result = {
        "config": outline.name,
        "config_path": plan.config_path,
        "overrides": plan.overrides,
        "fusions": plan.fusions,
        "skipped": plan.skipped,
        "vary": plan.vary,
        "seeds": plan.seeds,
        "epochs": outline.max_epochs,
        "split": splits[0] if len(splits) == 1 else splits,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "tasks": tasks,
        "latency_from": rows[0]["latency_from"],
        "latency_device": rows[0]["latency_device"],
        "groups": groups,
        "members": rows,
    }
    result["picks"] = pick_members(result)
    return result


def _group(label: str, members: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting's entry: its members, and every metric, the training time and the latency over its seeds."""
    first = members[0]
    return {
        "label": label,
        "fusion": first["fusion"],
        "vary": first["vary"],
        "members": [r["name"] for r in members],
        "metrics": {
            t: {k: seed_stats([r["metrics"][t][k] for r in members]) for k in first["metrics"][t]}
            for t in first["metrics"]
        },
        "params": first["params"],  # the seeds of one setting build the same model
        "train_s": seed_stats([r["train_s"] for r in members if r["train_s"] is not None] or [float("nan")]),
        "latency_ms": {b: seed_stats([r["latency_ms"][b] for r in members]) for b in first["latency_ms"]},
    }


def render_markdown(result: dict[str, Any]) -> str:
    """compare.md: the settings, one row per group, the plots, and the stress results when present."""
    sources = ", ".join(f"{m}: {s}" for m, s in result["latency_from"].items())
    lines = [*_header(result), "", *_table(result)]
    lines += [
        "",
        "Train: the `fit` time of each member's run (a resumed member: only its last session). Latency: median "
        f"of repeated forwards of the trained model on {result['latency_device']}, from {sources} (data loading "
        "and the feature-cache lookup excluded), then mean ± std over seeds. Times depend on the machine's load.",
        "",
    ]
    lines += pick_markdown(result["picks"]) if "picks" in result else []
    lines += [f"![{t}]({p})" for t, p in result["plots"].get("bars", {}).items()]
    if "stress" in result:
        lines += ["", *_stress_markdown(result)]
    lines += ["", "Members (run folders):", ""]
    lines += [f"- `{r['name']}` ({r['status']}): {r['run_dir']}" for r in result["members"]]
    return "\n".join(lines) + "\n"


def _header(result: dict[str, Any]) -> list[str]:
    """The title and the settings: config, overrides, fusions, varied keys, budget, seeds, split, date, skips."""
    over = ", ".join(f"`{o}`" for o in result["overrides"]) or "none"
    vary = "; ".join(f"`{k}` = {', '.join(v)}" for k, v in result["vary"].items()) or "nothing"
    lines = [
        f"# Fusion comparison on `{result['config']}`",
        "",
        f"- config: `{result['config']}` ({result['config_path'] or 'built-in'}); overrides: {over}",
        f"- fusions: {', '.join(result['fusions'])}; varied: {vary}",
        f"- budget: {result['epochs']} epochs for every member; seeds: {', '.join(map(str, result['seeds']))}",
        f"- metrics: each task's primary metric on the {result['split']} split, mean ± std over seeds",
        f"- date: {result['date']}; this command: {result['compare_wall_s'] / 60:.1f} min (finished members read back)",
    ]
    return lines + [f"- skipped {f}: {why}" for f, why in result["skipped"].items()]


def _table(result: dict[str, Any]) -> list[str]:
    """One row per group: each task's primary metric, parameters, training time (s) and latency (ms)."""
    tasks = result["tasks"]
    head = ["setting", *(f"{t} {s['metric']} {'↑' if s['higher_is_better'] else '↓'}" for t, s in tasks.items())]
    head += ["params trainable / total", "train (s)", *(f"latency b={b} (ms)" for b in LATENCY_BATCHES)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for g in result["groups"]:
        cells = [g["label"], *(fmt_stats(g["metrics"][t][s["metric"]]) for t, s in tasks.items())]
        cells += [f"{g['params']['trainable']:,} / {g['params']['total']:,}", fmt_stats(g["train_s"], 1)]
        cells += [fmt_stats(g["latency_ms"][str(b)], 3) for b in LATENCY_BATCHES]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _stress_markdown(result: dict[str, Any]) -> list[str]:
    """Per figure, a table: one row per (modality/kind, task's primary metric), one column per setting."""
    groups = result["stress"]["groups"]
    heads = [f"{t}/{s['metric']}" for t, s in result["tasks"].items()]
    labels = list(groups)
    lines = ["## Robustness", ""]
    for figure, what in (
        ("relative_robustness", "area under the metric-vs-severity curve"),
        ("effective_robustness", f"drop from clean compared with the baseline `{result['stress']['baseline']}`"),
    ):
        keys = sorted({k for g in groups.values() for k in g["robustness"] if k.endswith("/" + figure)})
        rows = [k for k in keys if any(k.endswith(f"/{h}/{figure}") for h in heads)]
        if not rows:
            continue
        lines += [f"{figure.replace('_', ' ')} ({what}; mean ± std over seeds):", ""]
        lines += ["| imperfection / metric | " + " | ".join(labels) + " |", "|---" + "|---:" * len(labels) + "|"]
        for k in rows:
            cells = [fmt_stats(groups[g]["robustness"][k]) if k in groups[g]["robustness"] else "" for g in labels]
            lines.append(f"| {k.removesuffix('/' + figure)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![{name}]({p})" for name, p in result["plots"].get("stress", {}).items()]
    return lines
