"""The mmfuse benchmark suite: one command, a table on stdout, JSON on disk. Asserts nothing about time.

    .venv/bin/python benchmarks/run.py [--quick] [--only NAME[,NAME]] [--out benchmarks/results.json] [--device cuda]

Comparisons (one file each): frozen, finetune, torchmultimodal, ceiling, scaling, inference.
See benchmarks/README.md for what each measures and the latest figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import bench_ceiling
import bench_finetune
import bench_frozen
import bench_inference
import bench_scaling
import bench_torchmultimodal
from common import THREADS, Result, Settings, fmt, setup

COMPARISONS = {
    "frozen": bench_frozen.run,
    "finetune": bench_finetune.run,
    "torchmultimodal": bench_torchmultimodal.run,
    "ceiling": bench_ceiling.run,
    "scaling": bench_scaling.run,
    "inference": bench_inference.run,
}
REPO = Path(__file__).resolve().parent.parent


def machine(device: Any) -> dict[str, Any]:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": _git(),
        "loadavg_start": list(os.getloadavg()),
        "busy_cores_start": busy_cores(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def busy_cores(seconds: float = 2.0) -> float:
    """How many cores other processes keep busy (sampled over `seconds` while this one sleeps); NaN off Linux."""

    def sample() -> tuple[float, float]:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # busy, total (idle and iowait are not busy)

    try:
        (b0, t0), c0 = sample(), time.process_time()
        time.sleep(seconds)
        (b1, t1), c1 = sample(), time.process_time()
    except OSError:
        return float("nan")
    return max(0.0, (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1) - (c1 - c0) / seconds)


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True)
        return head.stdout.strip() + (" (src modified)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def table(results: list[Result]) -> str:
    """A markdown table: one line per side, then one per target."""
    lines = ["| comparison | side | value | unit | vs | earlier | note |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | skipped | | | | | {r.skipped.splitlines()[0]} |")
            continue
        for row in r.rows:
            ref = fmt(row.reference) if row.reference is not None else ""
            lines.append(f"| {r.name} | {row.side} | {fmt(row.value)} | {row.unit} | {row.vs} | {ref} | {row.note} |")
    lines += ["", "| target | measured | threshold | per-round range | verdict |", "|---|---|---|---|---|"]
    for r in results:
        for t in r.targets:
            spread = f"{fmt(t.spread[0])} to {fmt(t.spread[1])}" if t.spread else ""
            lines.append(f"| {t.what} | {fmt(t.measured)} | {fmt(t.threshold)} | {spread} | **{t.verdict()}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few steps per comparison: a smoke run (< 2 minutes)")
    p.add_argument("--only", help=f"comma-separated comparisons to run, of: {', '.join(COMPARISONS)}")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results.json"), help="JSON results file")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--rounds", type=int, help="rounds of every comparison (default: each comparison's own)")
    p.add_argument("--limit", type=int, help="easy-VQA training records of `frozen` (default: all; --quick: 1024)")
    args = p.parse_args(argv)
    names = list(COMPARISONS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMPARISONS]
    if unknown:
        p.error(f"unknown comparison(s) {unknown}; choose from {', '.join(COMPARISONS)}")
    import torch

    device = setup(args.device)
    info = machine(device)
    print(f"# mmfuse benchmarks ({'quick' if args.quick else 'full'}) on {info['cpu']}, {THREADS} threads, {device}")
    print(f"# {info['date']}  torch {info['torch']}  git {info['git']}")
    busy = info["busy_cores_start"]
    print(
        f"# other processes keep {busy:.2f} of {info['cpu_count']} cores busy (load avg {info['loadavg_start'][0]:.2f})"
    )
    if device.type == "cpu" and busy > 0.25:
        print("# WARNING: the machine is not idle; figures will be low and noisy (see each side's 'cpu' share)")
    if "gpu" in info:
        print(f"# GPU: {info['gpu']}")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="mmfuse-bench-") as tmp:
        for name in names:
            t0 = time.perf_counter()
            print(f"\n## {name} ...", flush=True)
            torch.use_deterministic_algorithms(False)  # each comparison sets what it needs (see apply_trainer_flags)
            try:
                workdir = Path(tmp) / name
                workdir.mkdir(parents=True)
                res = COMPARISONS[name](Settings(device, args.quick, workdir, args.limit, args.rounds))
            except Exception as err:  # one broken comparison must not lose the others' figures
                traceback.print_exc()
                res = Result(name, skipped=f"error: {type(err).__name__}: {err}")
            res.seconds = time.perf_counter() - t0
            results.append(res)
            print(table([res]), flush=True)
            print(f"({name}: {res.seconds:.0f} s)", flush=True)
    info["loadavg_end"] = list(os.getloadavg())
    info["busy_cores_end"] = busy_cores()
    print("\n# all results\n")
    print(table(results))
    out = {"machine": info, "quick": args.quick, "results": [r.to_json() for r in results]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
