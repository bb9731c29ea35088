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
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True)
        return head.stdout.strip() + (" (src modified)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def table(results: list[Result]) -> str:
    """A markdown table: one line per side, then one per target."""
    lines = ["| comparison | side | value | unit | vs | note |", "|---|---|---|---|---|---|"]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | skipped | | | | {r.skipped} |")
            continue
        for row in r.rows:
            lines.append(f"| {r.name} | {row.side} | {fmt(row.value)} | {row.unit} | {row.vs} | {row.note} |")
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
    args = p.parse_args(argv)
    names = list(COMPARISONS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMPARISONS]
    if unknown:
        p.error(f"unknown comparison(s) {unknown}; choose from {', '.join(COMPARISONS)}")
    import torch

    device = setup(args.device)
    info = machine(device)
    print(f"# mmfuse benchmarks ({'quick' if args.quick else 'full'}) on {info['cpu']}, {THREADS} threads, {device}")
    print(f"# {info['date']}  torch {info['torch']}  git {info['git']}  load avg {info['loadavg_start'][0]:.2f}")
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
                res = COMPARISONS[name](Settings(device, args.quick, workdir))
            except Exception as err:  # one broken comparison must not lose the others' figures
                traceback.print_exc()
                res = Result(name, skipped=f"error: {type(err).__name__}: {err}")
            res.seconds = time.perf_counter() - t0
            results.append(res)
            print(table([res]), flush=True)
            print(f"({name}: {res.seconds:.0f} s)", flush=True)
    info["loadavg_end"] = list(os.getloadavg())
    print("\n# all results\n")
    print(table(results))
    out = {"machine": info, "quick": args.quick, "results": [r.to_json() for r in results]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
