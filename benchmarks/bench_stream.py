"""Peak memory and time to the first training step: records read into memory (`data.source: records`) vs streamed
from LitData shards (`mmfuse pack` + `data.source: shards`), at several data sizes.

Each run is a fresh process (`mmfuse train`, 1 epoch, batch 256, no loader workers so that one process holds all the
memory); peak RSS is that process's `ru_maxrss`, the first step is timed from the process start to the first call
of `training_step`. `--max-steps K` stops each epoch after K steps (for sizes whose full epoch does not fit).

    PYTHONPATH=src python benchmarks/bench_stream.py --sizes 100000 --out /tmp/stream
    PYTHONPATH=src python benchmarks/bench_stream.py --sizes 100000 1000000 --max-steps 200 --out /tmp/stream
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml
from synth_data import config, write_records

# Runs `mmfuse train` in this process with `training_step` timed (and stopped after MAX_STEPS when given).
CHILD = """
import json, os, resource, sys, time
t0 = time.perf_counter()
from mmfuse.train import module
orig, seen = module.MMFuseModule.training_step, {}
limit = int(os.environ.get("MAX_STEPS") or 0)
def step(self, *a, **k):
    seen.setdefault("first_step_s", time.perf_counter() - t0)
    seen["steps"] = seen.get("steps", 0) + 1
    if limit and seen["steps"] >= limit:
        self.trainer.should_stop = True
    return orig(self, *a, **k)
module.MMFuseModule.training_step = step
from mmfuse.cli import main
rc = main(sys.argv[1:])
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
seen.update(rc=rc, total_s=time.perf_counter() - t0, peak_rss_mb=rss)
print("BENCH " + json.dumps(seen))
"""


def run(args: list[str], max_steps: int) -> dict:
    env = {**os.environ, "MAX_STEPS": str(max_steps), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"failed: {' '.join(args)}\n{out.stderr[-2000:]}")
    return json.loads(line[6:])


def measure(n: int, root: Path, max_steps: int) -> dict:
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
        subprocess.run([sys.executable, "-m", "mmfuse.cli", "pack", str(cfg), "--out", str(shards)], check=True)
        pack_s = time.perf_counter() - t0
    row = {"records": n, "jsonl_mb": round(records.stat().st_size / 2**20, 1), "pack_s": pack_s}
    for path, extra in (("memory", []), ("streamed", ["--set", "data.source=shards", "--set", f"data.path={shards}"])):
        out = folder / f"run_{path}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        row[path] = run(["train", str(cfg), "--out", str(out), *extra], max_steps)
        print(n, path, row[path], flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: full epoch)")
    p.add_argument("--out", type=Path, required=True, help="scratch folder (records, shards, runs)")
    p.add_argument("--json", type=Path, help="also write the table here")
    args = p.parse_args()
    rows = [measure(n, args.out, args.max_steps) for n in args.sizes]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.python_version()}",
        "max_steps": args.max_steps,
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
