"""Wall time of the command line's quick answers: `--help`, `list` and argument or config errors.

Each command runs as a fresh process (what a user waits for). Rounds interleave every command (the order
rotates), so load bursts on a shared machine hit them all; the figures are medians over rounds with the
per-round range. Two floors are measured the same way: an empty interpreter (`python -c pass`) and
`python -c "import torch"` (what every one of these commands used to pay at least). With `--baseline-src`,
the same commands also run against another source tree (e.g. the code before a change), side by side.

    PYTHONPATH=src python benchmarks/bench_cli.py --rounds 5
    PYTHONPATH=src python benchmarks/bench_cli.py --rounds 5 --baseline-src /tmp/old/src
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# (label, arguments after `python`); the config errors use a valid config written to the scratch folder.
COMMANDS = [
    ("mmfuse --help", ["-m", "mmfuse.cli", "--help"]),
    ("mmfuse list", ["-m", "mmfuse.cli", "list"]),
    ("train missing.yaml", ["-m", "mmfuse.cli", "train", "missing.yaml"]),
    (
        "train cfg.yaml --set model.fusion.name=nope",
        ["-m", "mmfuse.cli", "train", "cfg.yaml", "--set", "model.fusion.name=nope"],
    ),
    ("train cfg.yaml --set model.colour=1", ["-m", "mmfuse.cli", "train", "cfg.yaml", "--set", "model.colour=1"]),
    ("train cfg.yaml --set train.lr=[1", ["-m", "mmfuse.cli", "train", "cfg.yaml", "--set", "train.lr=[1"]),
    ("predict no_run --text hi", ["-m", "mmfuse.cli", "predict", "no_run", "--text", "hi"]),
]
FLOORS = [("python -c pass", ["-c", "pass"]), ('python -c "import torch"', ["-c", "import torch"])]


def _time(args: list[str], src: Path, cwd: Path) -> tuple[float, int]:
    """(wall seconds, exit code) of one fresh `python ARGS` process."""
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - start, done.returncode


def _write_config(folder: Path) -> None:
    """The built-in config, as a file a user would pass."""
    from importlib import resources

    (folder / "cfg.yaml").write_text((resources.files("mmfuse") / "configs" / "easy_vqa.yaml").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline-src", type=Path, help="another source tree to time the same commands against")
    args = ap.parse_args()
    cases = [(label, a, SRC) for label, a in COMMANDS]
    if args.baseline_src:
        cases += [(f"{label} (baseline)", a, args.baseline_src) for label, a in COMMANDS]
    cases += [(label, a, SRC) for label, a in FLOORS]
    times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    codes: dict[str, set[int]] = {label: set() for label, _, _ in cases}
    with tempfile.TemporaryDirectory() as tmp:
        _write_config(Path(tmp))
        for r in range(args.rounds):
            shift = r % len(cases)
            for label, a, src in cases[shift:] + cases[:shift]:
                took, code = _time(a, src, Path(tmp))
                times[label].append(took)
                codes[label].add(code)
    load = os.getloadavg()
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"{time.strftime('%Y-%m-%d')}, {machine}, {args.rounds} rounds, load average at the end ", end="")
    print(f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}\n")
    print("| command | exit code | wall s (median) | per-round range |")
    print("|---|---|---|---|")
    for label, values in times.items():
        code = ",".join(map(str, sorted(codes[label])))
        print(f"| `{label}` | {code} | {statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} |")


if __name__ == "__main__":
    main()
