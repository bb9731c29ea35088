"""Latency of an exported model: onnxruntime (and optionally TorchScript) vs the PyTorch forward, batch 1 and 64.

The model is the built-in run's (`mmfuse train` with no arguments: EfficientNet-Lite0 at 128x128 + MiniLM, gated
fusion, four heads). Without `--run`, that config is trained here for one epoch on 512 records (`--set
train.max_epochs=1 --set data.limit=512`): the same network, so the same latency, in a minute instead of the full
run's few. The run is exported with `mmfuse.export.export_run` (checked against PyTorch), then each side runs the
same collated batches of the run's own test records (preprocessing excluded), interleaved in rounds (the order
rotates each round), with the same thread count; a figure is the median over all timed calls.

    .venv/bin/python benchmarks/bench_export.py                       # trains the small built-in run first
    .venv/bin/python benchmarks/bench_export.py --run runs/easy_vqa-... --formats onnx,torchscript
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_export.py --rounds 5

Not a test: it prints a markdown table and writes the figures, the machine, the command and the date to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 64)


def args_of(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="an existing run directory (default: train the small built-in run in --workdir)")
    p.add_argument("--workdir", default="/tmp/mmfuse-bench-export", help="where the small run and exports go")
    p.add_argument("--formats", default="onnx", help="comma-separated: onnx, torchscript")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=20, help="timed calls per side per round (batch 64: a quarter)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "export_results.json"))
    return p.parse_args(argv)


def small_builtin_run(workdir: Path) -> Path:
    """Train the built-in config for one epoch on 512 records (same network as the full run) via the CLI."""
    run = workdir / "run"
    if not (run / "model.safetensors").exists():
        sets = ["train.max_epochs=1", "data.limit=512", f"train.cache_dir={workdir / 'features'}"]
        cmd = [sys.executable, "-m", "mmfuse.cli", "train", "--out", str(run)]
        subprocess.run([*cmd, *(a for s in sets for a in ("--set", s))], check=True)
    return run


def sides(run: Path, workdir: Path, formats: list[str], threads: int) -> tuple[dict[str, Callable], Any, dict]:
    """{side: call(batch inputs)} for PyTorch and each exported format, the model, and each export's check."""
    import torch

    from mmfuse.export import export_run, read_export_info
    from mmfuse.export.backends import Runner
    from mmfuse.runs import load_run

    model = load_run(run)
    calls: dict[str, Callable] = {"pytorch": lambda inputs: model(inputs)}
    checks = {}
    for fmt in formats:
        path = export_run(run, workdir / f"export-{fmt}", fmt)
        info = read_export_info(path)
        checks[fmt] = info["check"]
        runner = Runner(path, fmt, threads=threads)
        names = [i["name"] for i in info["inputs"]]
        calls[runner.version.split()[0]] = lambda inputs, r=runner, n=names: r(n, flat_of(inputs, n))
    torch.set_num_threads(threads)
    return calls, model, checks


def flat_of(inputs: dict[str, Any], names: list[str]) -> list[Any]:
    """Collated inputs -> the tensors named `modality` or `modality.key`, in `names` order."""
    out = []
    for name in names:
        modality, _, key = name.partition(".")
        out.append(inputs[modality][key] if key else inputs[modality])
    return out


def measure(calls: dict[str, Callable], batch: dict[str, Any], rounds: int, n: int) -> dict[str, float]:
    """Median ms per call of each side, rounds interleaved (the order rotates each round), 3 warm-up calls each."""
    import torch

    times: dict[str, list[float]] = {side: [] for side in calls}
    order = list(calls)
    with torch.inference_mode():
        for r in range(rounds):
            for side in order[r % len(order) :] + order[: r % len(order)]:
                for _ in range(3):
                    calls[side](batch)
                for _ in range(n):
                    t0 = time.perf_counter()
                    calls[side](batch)
                    times[side].append((time.perf_counter() - t0) * 1e3)
    return {side: statistics.median(ts) for side, ts in times.items()}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    a = args_of(argv)
    warnings.filterwarnings("ignore")  # torch.jit's deprecation and tracer warnings: the check below is what counts
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = Path(a.run) if a.run else small_builtin_run(workdir)
    from mmfuse.export.build import collated, run_records
    from mmfuse.runs import open_run

    calls, model, checks = sides(run, workdir, [f for f in a.formats.split(",") if f], a.threads)
    records, split = run_records(open_run(run), max(BATCHES))
    table = {}
    for size in BATCHES:
        batch = collated(model, records[:size])
        table[size] = measure(calls, batch, a.rounds, a.calls if size == 1 else max(2, a.calls // 4))
    names = list(calls)
    print(f"\nrun {run} ({split} records), {a.threads} threads, median ms per call (preprocessing excluded)\n")
    print("| batch | " + " | ".join(names) + " | " + " | ".join(f"pytorch / {n}" for n in names[1:]) + " |")
    print("|---" * (2 * len(names)) + "|")
    for size, row in table.items():
        ratios = [row["pytorch"] / row[n] for n in names[1:]]
        print(
            f"| {size} | "
            + " | ".join(f"{row[n]:.2f}" for n in names)
            + " | "
            + " | ".join(f"{x:.2f}x" for x in ratios)
            + " |"
        )
    for fmt, check in checks.items():
        print(f"\n{fmt} check: {check['summary']} on {check['records']} {check['split']} records")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cpus, {platform.system()} {platform.machine()}",
        "load_average": os.getloadavg(),
        "commit": commit.stdout.strip(),
        "run": str(run),
        "threads": a.threads,
        "median_ms": {str(k): v for k, v in table.items()},
        "checks": checks,
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
