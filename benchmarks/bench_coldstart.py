"""Cold start of `mmfuse predict` on one record, as a ratio to `python -c "import torch"` (any PyTorch tool's floor),
with each engine: `--engine torch` (the PyTorch model) and `--engine onnx` (the run's ONNX export with onnxruntime,
without importing torch), and the default (`auto`: onnx when the run holds a current export).

Each command runs as a fresh process, alternately, for `--rounds` rounds (the order rotates each round), so a burst
of load on this shared machine hits both alike; the figures are medians, and the ratio is given both as the ratio
of the medians and as the median of each round's own ratio. With `--baseline-src`, the same predict also runs
against another source tree (e.g. the code before a change, `git archive COMMIT src | tar -x -C /tmp/old`).

A third command imports only the libraries the built-in run cannot predict without (torch, torchvision, timm,
transformers' BERT and its tokenizer): what is left above it is mmfuse's own cost (`--no-libraries` skips it).

One more, untimed predict per engine runs under `python -X importtime`: it lists which heavy packages the process
imported and splits its import time by top-level package (each module's own time, so the packages add up).

    PYTHONPATH=src python benchmarks/bench_coldstart.py --run /tmp/coldstart/run --rounds 7 \
        --out benchmarks/coldstart_results.json
    PYTHONPATH=src python benchmarks/bench_coldstart.py --run /tmp/coldstart/run --baseline-src /tmp/old/src

Without a finished run at `--run`, the built-in run is trained there first, small (`mmfuse train --set
train.max_epochs=1 --set data.limit=2000`: the same network; a cold start does not depend on its accuracy); without
a current export in RUN/export, `mmfuse export RUN` writes it.
The record: an easy-VQA test image (from the `easy_vqa` package) and a question, or `--image`/`--text`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ["torch", "torchvision", "timm", "transformers", "tokenizers", "scipy", "sympy", "lightning",
         "pytorch_lightning", "torchmetrics", "matplotlib", "pandas", "sklearn"]  # fmt: skip


# What the built-in run (timm EfficientNet-Lite0 + Hugging Face MiniLM) cannot predict without: a second floor.
LIBRARIES = (
    "import torch, torchvision.transforms.v2, timm, tokenizers; from transformers import AutoModel, AutoTokenizer; "
    "import transformers.models.bert.modeling_bert, transformers.models.bert.tokenization_bert"
)
LATER_TORCH = "torch.* after `import torch` (torch._dynamo, ...)"


def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _time(args: list[str], src: Path) -> tuple[float, int]:
    """(wall seconds, exit code) of one fresh `python ARGS` process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=_env(src), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, done.returncode


def _default_image() -> str:
    import easy_vqa

    images = Path(easy_vqa.__file__).parent / "data" / "test" / "images"
    return str(min(images.glob("*.png")))


def _ensure_run(run: Path) -> None:
    if not (run / "model.safetensors").is_file():
        print(f"no finished run at {run}: training the built-in run there (1 epoch, 2000 records)", file=sys.stderr)
        cmd = "-m mmfuse.cli train --set train.max_epochs=1 --set data.limit=2000 --out".split() + [str(run)]
        subprocess.run([sys.executable, *cmd], env=_env(SRC), check=True)
    sys.path.insert(0, str(SRC))
    from mmfuse.export.runtime import EngineError, read_export

    try:
        read_export(run)
    except EngineError as err:
        print(f"{err}: exporting it (mmfuse export {run})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "mmfuse.cli", "export", str(run)], env=_env(SRC), check=True)


def _import_breakdown(predict: list[str]) -> tuple[float, dict[str, float], list[str]]:
    """(wall s, {top-level package: own import s}, heavy packages imported) of one `-X importtime` predict."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *predict], env=_env(SRC), capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - start
    own: dict[str, float] = defaultdict(float)
    torch_done = False  # the torch.* modules imported after `import torch` itself (torch._dynamo: by torchvision)
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            top = m[2].split(".")[0]
            own[LATER_TORCH if top == "torch" and torch_done else top] += int(m[1]) / 1e6
            torch_done = torch_done or m[2] == "torch"
    return wall, dict(own), [p for p in HEAVY if p in own]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("/tmp/coldstart/run"), help="a finished run (trained if absent)")
    ap.add_argument("--image", help="default: an easy-VQA test image")
    ap.add_argument("--text", default="what color is the shape?")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline-src", type=Path, help="another source tree to time the same predict against")
    ap.add_argument("--out", type=Path, help="write every timing as JSON here")
    ap.add_argument(
        "--no-libraries", action="store_true", help="skip the libraries' floor (a run other than the built-in)"
    )
    args = ap.parse_args()
    _ensure_run(args.run)
    predict = ["-m", "mmfuse.cli", "predict", str(args.run), "--image", args.image or _default_image()]
    predict += ["--text", args.text]
    engines = {e: [*predict, "--engine", e] for e in ("torch", "onnx")}
    cases = [('python -c "import torch"', ["-c", "import torch"], SRC)]
    cases += [(f"mmfuse predict --engine {e} (one record)", a, SRC) for e, a in engines.items()]
    cases.append(("mmfuse predict (one record, default engine: auto)", predict, SRC))
    if not args.no_libraries:
        cases.append(("the run's libraries, imported only", ["-c", LIBRARIES], SRC))
    if args.baseline_src:
        cases.append(("mmfuse predict (baseline)", predict, args.baseline_src))
    times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    codes: dict[str, set[int]] = {label: set() for label, _, _ in cases}
    load_start = os.getloadavg()
    for r in range(args.rounds):
        shift = r % len(cases)
        for label, a, src in cases[shift:] + cases[:shift]:
            took, code = _time(a, src)
            times[label].append(took)
            codes[label].add(code)
    breakdown = {e: _import_breakdown(a) for e, a in engines.items()}
    load = os.getloadavg()
    _report(args, cases, times, codes, load_start, load, breakdown)
    if args.out:
        record = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(), "load": [load_start, load]}
        record |= {"times": times, "codes": {k: sorted(v) for k, v in codes.items()}, "argv": sys.argv}
        record["importtime"] = {e: {"wall": w, "own": o, "heavy": h} for e, (w, o, h) in breakdown.items()}
        record["summary"] = _summary(times)
        args.out.write_text(json.dumps(record, indent=1))


def _machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}"


def _summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per command: median wall s, and x `import torch` (ratio of the medians, and median of each round's ratio)."""
    floor = next(iter(times.values()))
    return {
        label: {
            "median_s": statistics.median(values),
            "x_import_torch": statistics.median(values) / statistics.median(floor),
            "x_import_torch_per_round": statistics.median(v / f for v, f in zip(values, floor)),
        }
        for label, values in times.items()
    }


def _report(args, cases, times, codes, load_start, load, breakdown) -> None:  # noqa: ANN001
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {_machine()}, {args.rounds} rounds, load average ", end="")
    print(f"{load_start[0]:.1f}/{load_start[1]:.1f} at the start, {load[0]:.1f}/{load[1]:.1f} at the end\n")
    print("| command | exit code | wall s (median) | range | x import torch (of medians) | x (median per round) |")
    print("|---|---|---|---|---|---|")
    for label, row in _summary(times).items():
        code, values = ",".join(map(str, sorted(codes[label]))), times[label]
        print(
            f"| `{label}` | {code} | {row['median_s']:.2f} | {min(values):.2f}-{max(values):.2f} | "
            f"{row['x_import_torch']:.2f} | {row['x_import_torch_per_round']:.2f} |"
        )
    for engine, (wall, own, heavy) in breakdown.items():
        total = sum(own.values())
        print(f"\n`--engine {engine}` once more under `-X importtime` (inflated by it): {wall:.2f} s wall, ", end="")
        print(f"{total:.2f} s of imports (the rest, {wall - total:.2f} s, is work outside import statements: reading")
        print("the run or its export, building the model or the onnxruntime session, predicting, and the libraries'")
        print("own, such as transformers scanning its model folders). Heavy packages it imported: ", end="")
        print(", ".join(heavy) or "none")
        print("\n| top-level package | own import s |\n|---|---|")
        top = sorted(own.items(), key=lambda kv: -kv[1])
        for name, seconds in top[:10]:
            print(f"| {name} | {seconds:.2f} |")
        print(f"| (the other {len(top) - 10}) | {sum(s for _, s in top[10:]):.2f} |")


if __name__ == "__main__":
    main()
