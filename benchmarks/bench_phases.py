"""The phases of `mmfuse train` on the built-in run, reproduced: each a median over rounds, read from metrics.json.

Each round trains the built-in easy-VQA config (or CONFIG) twice in fresh processes, as a user runs it
(`python -m mmfuse.cli train [CONFIG] --out DIR [--set ...]`):

- empty cache: `MMFUSE_CACHE_DIR` is a new, empty folder private to this round, so `features` encodes every
  distinct input of the run's frozen encoders;
- warm cache: the same command again on that folder, now filled, so `features` only reads it.

Each run's phase times come from its own `metrics.json` (`timings_s`: load_records, build_model,
validate_records, features, fit, evaluate, total, as `train()` measures them), with the process's wall time
(imports and writing included) beside them. Nothing is quoted from one run: every figure is the median over the
rounds with the per-round range. Run from the repository root:

    PYTHONPATH=src python benchmarks/bench_phases.py --rounds 3                       # the full built-in run
    PYTHONPATH=src python benchmarks/bench_phases.py --rounds 2 --set data.limit=2000   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PHASES = ("load_records", "build_model", "validate_records", "features", "fit", "evaluate", "total")


def train_once(config: str | None, sets: list[str], run_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """One `mmfuse train` process; returns its timings_s, wall time, epochs and test metrics."""
    cmd = [sys.executable, "-m", "mmfuse.cli", "train", *([config] if config else []), "--out", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "MMFUSE_CACHE_DIR": str(cache_dir)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"bench_phases: `{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "metrics.json").read_text())
    return {
        "timings_s": summary["timings_s"],
        "process_wall_s": wall,
        "epochs": summary.get("epochs"),
        "records": summary.get("records"),
        "test": summary.get("metrics", {}).get("test", {}),
    }


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def table(rounds: list[dict[str, Any]]) -> str:
    """Markdown: one line per phase, median (range) for the empty- and the warm-cache runs."""
    lines = ["| phase | empty cache: s, median (range) | warm cache: s, median (range) |", "|---|---|---|"]
    for phase in (*PHASES, "process_wall_s"):
        cells = []
        for kind in ("empty", "warm"):
            vals = [
                r[kind]["process_wall_s"] if phase == "process_wall_s" else r[kind]["timings_s"].get(phase)
                for r in rounds
            ]
            vals = [v for v in vals if v is not None]
            s = stats(vals) if vals else None
            cells.append(f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})" if s else "-")
        name = "process wall (imports + all phases + writing)" if phase == "process_wall_s" else f"`{phase}`"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML run config (default: the built-in easy-VQA config)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="config override, as `mmfuse train --set`")
    p.add_argument("--out", default=str(HERE / "phases_results.json"), help="JSON results file")
    args = p.parse_args(argv)
    rounds: list[dict[str, Any]] = []
    load = [os.getloadavg()]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmfuse-phases-") as tmp:
        for r in range(args.rounds):
            cache = Path(tmp) / f"cache{r}"  # empty: a new folder each round
            cache.mkdir()
            got = {}
            for kind in ("empty", "warm"):
                got[kind] = train_once(args.config, args.set, Path(tmp) / f"run{r}-{kind}", cache)
                load.append(os.getloadavg())
                t = got[kind]["timings_s"]
                print(f"round {r + 1}/{args.rounds} {kind}: " + ", ".join(f"{k} {v}" for k, v in t.items()), flush=True)
            rounds.append(got)
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": load,
        "seconds": time.perf_counter() - t_start,
        "sets": args.set,
        "summary": {
            kind: {
                ph: stats([r[kind]["timings_s"][ph] for r in rounds])
                for ph in PHASES
                if all(ph in r[kind]["timings_s"] for r in rounds)
            }
            | {"process_wall_s": stats([r[kind]["process_wall_s"] for r in rounds])}
            for kind in ("empty", "warm")
        },
        "rounds": rounds,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(table(rounds))
    print(f"load average (1 min) {min(x[0] for x in load):.2f}-{max(x[0] for x in load):.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
