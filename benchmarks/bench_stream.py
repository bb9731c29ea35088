"""Records read into memory (`data.source: records`) vs streamed from LitData shards (`mmfuse pack` +
`data.source: shards`), at several data sizes: peak memory, time to the first training step, and the throughput of
the fit phase of both paths side by side.

Each run is a fresh process (`mmfuse train`, 1 epoch, batch 256, no loader workers so that one process holds all the
memory and does all the work); peak RSS is that process's `ru_maxrss`, the first step is timed from the process
start to the first call of `training_step`. The fit phase runs from the first `training_step` call to the last one:
its records are those of every step but the last (each whole: loaded, collated, forward, backward, optimiser step),
timed both in wall time and in the process's CPU time (user + sys, `time.process_time`); on a shared machine the CPU
time is the steadier of the two. `--rounds R` runs both paths R times, alternating, and reports each round and the
median. `--max-steps K` stops each epoch after K steps (for sizes whose full epoch does not fit).

    PYTHONPATH=src python benchmarks/bench_stream.py --sizes 100000 --rounds 3 --out /tmp/stream
    PYTHONPATH=src python benchmarks/bench_stream.py --sizes 100000 1000000 --max-steps 200 --out /tmp/stream
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
from pathlib import Path

import yaml
from synth_data import config, write_records

from mmfuse.data.shards import DEFAULT_CHUNK_BYTES

# Runs `mmfuse train` in this process with `training_step` timed (and stopped after MAX_STEPS when given).
CHILD = """
import json, os, resource, sys, time
t0 = time.perf_counter()
from mmfuse.train import module
orig, seen = module.MMFuseModule.training_step, {"fit_records": 0}
limit = int(os.environ.get("MAX_STEPS") or 0)
def step(self, batch, *a, **k):
    now = (time.perf_counter(), time.process_time())
    if "first" not in seen:
        seen["first"] = now
        seen["first_step_s"] = now[0] - t0
    else:  # the previous step is whole: its records count
        seen["fit_records"] += seen["batch"]
        seen["fit_wall_s"], seen["fit_cpu_s"] = now[0] - seen["first"][0], now[1] - seen["first"][1]
    seen["batch"] = len(batch["index"])
    seen["steps"] = seen.get("steps", 0) + 1
    if limit and seen["steps"] >= limit:
        self.trainer.should_stop = True
    return orig(self, batch, *a, **k)
module.MMFuseModule.training_step = step
from mmfuse.cli import main
rc = main(sys.argv[1:])
use = resource.getrusage(resource.RUSAGE_SELF)
del seen["first"], seen["batch"]
seen.update(rc=rc, total_s=time.perf_counter() - t0, cpu_s=use.ru_utime + use.ru_stime)
seen["peak_rss_mb"] = use.ru_maxrss / 1024
print("BENCH " + json.dumps(seen))
"""

PATHS = ("memory", "streamed")


def run(args: list[str], max_steps: int) -> dict:
    env = {**os.environ, "MAX_STEPS": str(max_steps), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"failed: {' '.join(args)}\n{out.stderr[-2000:]}")
    row = json.loads(line[6:])
    if row.get("fit_wall_s"):
        row["fit_records_per_s"] = row["fit_records"] / row["fit_wall_s"]
        row["fit_records_per_cpu_s"] = row["fit_records"] / row["fit_cpu_s"]
    return row


def summary(runs: dict[str, list[dict]]) -> dict:
    """Medians per path and the streamed / in-memory throughput ratios (by wall and by CPU time), each round's too."""
    out: dict = {}
    for path in PATHS:
        rows = [r for r in runs[path] if r.get("fit_wall_s")]
        out[path] = {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], float)}
    for kind in ("fit_records_per_s", "fit_records_per_cpu_s"):
        pairs = zip(runs["streamed"], runs["memory"], strict=True)
        per_round = [s[kind] / m[kind] for s, m in pairs if kind in s and kind in m]
        out[f"ratio_{kind}"] = {"median": statistics.median(per_round), "rounds": per_round}
    return out


def measure(n: int, root: Path, max_steps: int, rounds: int, chunk_bytes: str | None = None) -> dict:
    folder = root / f"n{n}"
    records = folder / "records.jsonl"
    if not records.exists():
        write_records(records, n)
    cfg = folder / "config.yaml"
    cfg.write_text(yaml.safe_dump(config(records)))
    shards = folder / "shards"
    pack_s = None
    if not (shards / "mmfuse_manifest.json").exists():
        t0 = time.perf_counter()
        chunk = ["--chunk-bytes", chunk_bytes] if chunk_bytes else []
        subprocess.run([sys.executable, "-m", "mmfuse.cli", "pack", str(cfg), "--out", str(shards), *chunk], check=True)
        pack_s = time.perf_counter() - t0
    row = {"records": n, "jsonl_mb": round(records.stat().st_size / 2**20, 1), "pack_s": pack_s}
    runs: dict[str, list[dict]] = {p: [] for p in PATHS}
    extra = {"memory": [], "streamed": ["--set", "data.source=shards", "--set", f"data.path={shards}"]}
    for r in range(rounds):
        for path in PATHS:
            out = folder / f"run_{path}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            runs[path].append(run(["train", str(cfg), "--out", str(out), *extra[path]], max_steps))
            print(n, f"round {r}", path, runs[path][-1], flush=True)
    row.update({p: runs[p][0] for p in PATHS} if rounds == 1 else {"runs": runs})
    row["summary"] = summary(runs)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: full epoch)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each path, alternating")
    p.add_argument("--out", type=Path, required=True, help="scratch folder (records, shards, runs)")
    p.add_argument("--json", type=Path, help="also write the table here")
    p.add_argument(
        "--chunk-bytes", help="`mmfuse pack --chunk-bytes` (default: pack's, 16MB); shards already in --out are reused"
    )
    args = p.parse_args()
    rows = [measure(n, args.out, args.max_steps, args.rounds, args.chunk_bytes) for n in args.sizes]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.python_version()}",
        "command": " ".join(["benchmarks/bench_stream.py", *sys.argv[1:]]),
        "max_steps": args.max_steps,
        "chunk_bytes": args.chunk_bytes or DEFAULT_CHUNK_BYTES,
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    for row in rows:
        s = row["summary"]
        m, st = s["memory"], s["streamed"]
        print(
            f"{row['records']} records, fit records/s (per CPU second): in memory {m['fit_records_per_s']:.0f} "
            f"({m['fit_records_per_cpu_s']:.0f}), streamed {st['fit_records_per_s']:.0f} "
            f"({st['fit_records_per_cpu_s']:.0f}); streamed / in memory: {s['ratio_fit_records_per_s']['median']:.3f}x "
            f"wall, {s['ratio_fit_records_per_cpu_s']['median']:.3f}x CPU"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
