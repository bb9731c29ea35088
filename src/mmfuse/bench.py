"""`mmfuse bench mtl`: multi-task models against one single-task model per task, summarised as Δm.

For every seed, one single-task model per task (the config with `tasks` cut to that task, its monitor
set to that task's primary metric, equal weighting) and one multi-task model per task weighting are
trained with the same config otherwise: same data, epochs and seed. The single-task baselines are
shared by all weightings. Each model is scored by every task's primary metric (`Task.default_metric`)
on the test split (the val split when the data has no test split), and each weighting by

    Δm = (100 / T) Σ_t (-1)^{l_t} (M_mt,t - M_st,t) / |M_st,t|,   l_t = 1 when lower is better,

(Maninis et al. 2019; Vandenhende et al. 2021), so a positive Δm means the multi-task model beats the
single-task models on average. Metrics are averaged over the seeds before Δm is taken.

Runs land in `out_dir/<model>/seed<k>`; a finished run with the same config is reused, an interrupted
one resumed, so a bench that stopped halfway can be started again with the same arguments. That step, the
scoring split, the primary metrics and the mean and std over seeds are `mmfuse.multirun`'s, shared with
`mmfuse compare`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

from mmfuse.builders import run_outline
from mmfuse.config import ConfigError, RunConfig, load_config, parse_config
from mmfuse.io import atomic_write_text
from mmfuse.multirun import fmt_stats, primary_metrics, scoring_split, seed_stats, train_or_reuse
from mmfuse.tasks import TASK_KINDS

log = logging.getLogger(__name__)

SINGLE = "single-task"
DEFINITION = (
    "Δm = (100 / T) Σ_t (-1)^{l_t} (M_mt,t - M_st,t) / |M_st,t|, where M_mt,t and M_st,t are task t's primary "
    "metric for the multi-task model and for the single-task model of t, and l_t = 1 when lower is better. "
    "Positive Δm: the multi-task model is better on average."
)


def delta_m(mt: dict[str, float], st: dict[str, float], higher_is_better: dict[str, bool]) -> float:
    """Mean relative gain (%) of a multi-task model over the single-task ones; positive is better.

    Args:
        mt: {task: metric of the multi-task model}.
        st: {task: metric of that task's single-task model}.
        higher_is_better: {task: whether a higher metric is better}.

    Raises:
        ValueError: when the tasks of the three differ, or a single-task metric is 0 (no relative change).
    """
    if not st or set(mt) != set(st) or set(st) != set(higher_is_better):
        raise ValueError(
            f"delta_m: tasks differ: mt {sorted(mt)}, st {sorted(st)}, directions {sorted(higher_is_better)}"
        )
    total = 0.0
    for task, base in st.items():
        if base == 0:
            raise ValueError(f"delta_m: the single-task {task!r} metric is 0, so its relative change is undefined")
        sign = 1.0 if higher_is_better[task] else -1.0
        total += sign * (mt[task] - base) / abs(base)
    return 100.0 * total / len(st)


def resolve_weightings(names: list[str]) -> list[str]:
    """Registered weighting names in the given order, "all" expanded, duplicates dropped."""
    from mmfuse.mtl import WEIGHTINGS

    out: list[str] = []
    for name in (n.strip() for n in names):
        for w in WEIGHTINGS.names() if name == "all" else [name] if name else []:
            if w not in WEIGHTINGS:
                raise ConfigError(
                    f"--weightings: unknown weighting {w!r}; choose from: all, {', '.join(WEIGHTINGS.names())}"
                )
            if w not in out:
                out.append(w)
    if not out:
        raise ConfigError("--weightings: name at least one weighting (or 'all')")
    return out


def single_task_config(base: RunConfig, task: str, seed: int) -> RunConfig:
    """`base` cut to one task: monitored by that task's primary metric, its loss weighed 1."""
    data = base.model_dump(mode="json")
    metric = TASK_KINDS.get(run_outline(base).tasks[task]).default_metric
    data["seed"] = seed
    data["tasks"] = {task: {**data["tasks"][task], "weight": 1.0}}
    data["train"].update(weighting={"name": "equal"}, monitor=f"val/{task}/{metric}", progress_bar=False)
    return parse_config(data)


def multi_task_config(base: RunConfig, weighting: str, seed: int) -> RunConfig:
    """`base` with the task weighting `weighting` (its options kept when `base` already names it)."""
    data = base.model_dump(mode="json")
    data["seed"] = seed
    if run_outline(base).weighting != weighting:
        data["train"]["weighting"] = {"name": weighting}
    data["train"]["progress_bar"] = False
    return parse_config(data)


def _delta(mt: dict[str, float], st: dict[str, float], hib: dict[str, bool]) -> float:
    try:
        return delta_m(mt, st, hib)
    except ValueError as err:
        log.warning("bench: %s", err)
        return float("nan")


def _resolved(run_dir: str) -> RunConfig:
    """A finished run's resolved config (its `config.yaml`)."""
    return load_config(Path(run_dir) / "config.yaml")


class Job(NamedTuple):
    """One run of the bench: a single-task model (`task` set) or a multi-task one (`task` None)."""

    model: str  # SINGLE or the weighting's name
    task: str | None
    seed: int
    cfg: RunConfig
    run_dir: Path


def _plan(base: RunConfig, weightings: list[str], seeds: list[int], out_dir: Path) -> list[Job]:
    """Every run of the bench, configs validated up front (before anything is trained)."""
    jobs: list[Job] = []
    for seed in seeds:
        for t in run_outline(base).tasks:
            jobs.append(
                Job(SINGLE, t, seed, single_task_config(base, t, seed), out_dir / f"single-{t}" / f"seed{seed}")
            )
        for w in weightings:
            jobs.append(Job(w, None, seed, multi_task_config(base, w, seed), out_dir / w / f"seed{seed}"))
    return jobs


def run_mtl_bench(
    config: str | Path | None, overrides: list[str], weightings: list[str], seeds: list[int], out_dir: str | Path
) -> str:
    """Train the single-task baselines and one multi-task model per weighting and seed; report Δm.

    Args:
        config: YAML run config (None: the built-in easy-VQA one).
        overrides: `a.b=c` config overrides, applied to every run.
        weightings: task weighting names, or ["all"] for every registered one.
        seeds: seeds; metrics are averaged over them.
        out_dir: where the runs, `delta_m.md` and `delta_m.json` go.

    Returns:
        The markdown report (also written to `out_dir/delta_m.md`).
    """
    start = time.perf_counter()
    base = load_config(config, list(overrides))
    outline = run_outline(base)
    names = resolve_weightings(list(weightings))
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = _plan(base, names, seeds, out_dir)
    runs: dict[tuple[str, str | None, int], dict[str, Any]] = {}
    for i, job in enumerate(jobs, 1):
        label = f"single-task model of {job.task}" if job.task else f"multi-task model, {job.model} weighting"
        log.info("bench [%d/%d] seed %d: %s -> %s", i, len(jobs), job.seed, label, job.run_dir)
        summary, _ = train_or_reuse(job.cfg, job.run_dir)
        split = scoring_split(summary, job.run_dir)
        runs[(job.model, job.task, job.seed)] = {
            "run_dir": str(job.run_dir),
            "split": split,
            "metrics": summary["metrics"][split],
            "wall_s": summary["timings_s"]["total"],
        }
        log.info("bench [%d/%d] done in %.0f s", i, len(jobs), summary["timings_s"]["total"])
    result = {
        "config": outline.name,
        "config_path": str(config) if config is not None else None,
        "overrides": list(overrides),
        "epochs": outline.max_epochs,
        "seeds": seeds,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "definition": DEFINITION,
        **summarise(runs, list(outline.tasks), names, seeds),
        "bench_wall_s": round(time.perf_counter() - start, 1),
    }
    text = render_markdown(result)
    atomic_write_text(out_dir / "delta_m.json", json.dumps(result, indent=2))
    atomic_write_text(out_dir / "delta_m.md", text)
    return text


def summarise(
    runs: dict[tuple[str, str | None, int], dict[str, Any]], tasks: list[str], weightings: list[str], seeds: list[int]
) -> dict[str, Any]:
    """Per model: each task's primary metric and the wall time over seeds, and each weighting's Δm.

    Δm's `mean` is Δm of the seed-mean metrics; its `std` is the std of the per-seed Δm.
    """
    primary = {t: primary_metrics(_resolved(runs[(SINGLE, t, seeds[0])]["run_dir"]))[t] for t in tasks}
    metric = {t: p["metric"] for t, p in primary.items()}
    hib = {t: p["higher_is_better"] for t, p in primary.items()}
    splits = sorted({r["split"] for r in runs.values()})
    if len(splits) > 1:
        log.warning("bench: runs were scored on different splits: %s", ", ".join(splits))

    def scores(model: str, seed: int) -> dict[str, float]:
        return {t: runs[(model, t if model == SINGLE else None, seed)]["metrics"][t][metric[t]] for t in tasks}

    st = {s: scores(SINGLE, s) for s in seeds}
    models: dict[str, Any] = {
        SINGLE: {
            "metrics": {t: seed_stats([st[s][t] for s in seeds]) for t in tasks},
            "wall_s": {t: seed_stats([runs[(SINGLE, t, s)]["wall_s"] for s in seeds]) for t in tasks},
            "runs": {t: [runs[(SINGLE, t, s)]["run_dir"] for s in seeds] for t in tasks},
        }
    }
    st_mean = {t: models[SINGLE]["metrics"][t]["mean"] for t in tasks}
    for w in weightings:
        mt = {s: scores(w, s) for s in seeds}
        metrics = {t: seed_stats([mt[s][t] for s in seeds]) for t in tasks}
        dm = seed_stats([_delta(mt[s], st[s], hib) for s in seeds])
        dm["mean"] = _delta({t: m["mean"] for t, m in metrics.items()}, st_mean, hib)
        models[w] = {
            "metrics": metrics,
            "delta_m": dm,
            "wall_s": seed_stats([runs[(w, None, s)]["wall_s"] for s in seeds]),
            "runs": [runs[(w, None, s)]["run_dir"] for s in seeds],
        }
    return {
        "split": splits[0],
        "tasks": primary,
        "models": models,
    }


def render_markdown(result: dict[str, Any]) -> str:
    """The report: a header naming the config, budget and seeds, one table row per model, the Δm definition."""
    tasks = result["tasks"]
    seeds = ", ".join(str(s) for s in result["seeds"])
    over = ", ".join(f"`{o}`" for o in result["overrides"]) or "none"
    spread = " (mean ± std over seeds)" if len(result["seeds"]) > 1 else ""
    head = ["model", *(f"{t} {m['metric']} {'↑' if m['higher_is_better'] else '↓'}" for t, m in tasks.items())]
    head += ["Δm (%) ↑", "wall time per model (s)"]
    lines = [
        f"# Multi-task vs single-task: Δm on `{result['config']}`",
        "",
        f"- config: `{result['config']}` ({result['config_path'] or 'built-in'}); overrides: {over}",
        f"- budget: {result['epochs']} epochs for every model; seeds: {seeds}",
        f"- metrics: each task's primary metric on the {result['split']} split{spread}",
        f"- date: {result['date']}; whole bench: {result['bench_wall_s'] / 60:.1f} min",
        "",
        "| " + " | ".join(head) + " |",
        "|---" + "|---:" * (len(head) - 1) + "|",
    ]
    for name, m in result["models"].items():
        cells = [f"{name} (one model per task)" if name == SINGLE else name]
        cells += [fmt_stats(m["metrics"][t], 4) for t in tasks]
        if name == SINGLE:
            cells += ["0 (reference)", " / ".join(f"{m['wall_s'][t]['mean']:.0f}" for t in tasks)]
        else:
            cells += [fmt_stats(m["delta_m"], 2, signed=True), f"{m['wall_s']['mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        DEFINITION,
        "Δm is computed from the seed-mean metrics; its ± is the std of the per-seed Δm. "
        "Single-task wall times are one per task, in column order; "
        "each is the whole run (records, features, fit, evaluation).",
    ]
    return "\n".join(lines) + "\n"
