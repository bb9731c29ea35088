"""Do `mmfuse predict --engine onnx` and `--engine torch` give the same answers on a whole split?

Writes the split's records (every input present) to a records file, runs `mmfuse predict RUN --input FILE --output
...` once per engine (fresh processes, wall time each), and compares the two JSONL files record by record: per task,
the records whose answer differs (label, or set of labels) and the max |probability difference| (the value's, for a
regression). Then, in this process, the raw outputs of both engines on the same batches (the onnx engine's
`OnnxPredictor.logits`, the torch engine's model forward on `Predictor.batches`): max |logit difference| per task,
preprocessing included. The run must hold a current ONNX export (`mmfuse export RUN`).

Usage: python benchmarks/check_engines.py RUN --out DIR [--split test] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def write_records(run: Path, split: str, path: Path, limit: int | None = None) -> int:
    """The split's records with every input present, as a JSONL of their input fields (absolute file paths)."""
    from mmfuse.builders import build_schema, load_splits
    from mmfuse.predict import Predictor

    predictor = Predictor(run, device="cpu")
    records = load_splits(predictor.config, build_schema(predictor.config, predictor.model.encoders))[split]
    fields = {m: predictor.schema.field_of(m) for m in predictor.modalities}
    rows = [
        {fields[m]: ref for m, ref in r.inputs.items()}
        for r in records
        if all(r.inputs.get(m) is not None for m in predictor.modalities)
    ]
    rows = rows[:limit] if limit else rows
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def predict(run: Path, records: Path, engine: str, out: Path, batch: int) -> float:
    """Wall seconds of one `mmfuse predict` process of `records` with `engine` into `out`."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "mmfuse.cli", "-v", "predict", str(run), "--engine", engine, "--input", str(records)]
    cmd += ["--allow-outside-root", "--output", str(out), "--batch-size", str(batch)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{engine}: exit {done.returncode}: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def compare_answers(torch_file: Path, onnx_file: Path) -> dict[str, dict[str, float]]:
    """Per task: records, different answers, max |probability (or value) difference|."""
    stats: dict[str, dict[str, float]] = {}
    with open(torch_file) as a, open(onnx_file) as b:
        for line_a, line_b in zip(a, b, strict=True):
            want, got = json.loads(line_a), json.loads(line_b)
            assert want["source"] == got["source"], (want["source"], got["source"])
            for task, w in want.items():
                if task == "source":
                    continue
                g, s = got[task], stats.setdefault(task, {"records": 0, "different_answers": 0, "max_abs_diff": 0.0})
                s["records"] += 1
                answer = next(k for k in ("label", "labels", "value") if k in w)
                s["different_answers"] += answer != "value" and w[answer] != g[answer]
                if answer == "value":
                    diff = abs(w["value"] - g["value"])
                else:
                    diff = max(abs(p - g["probabilities"][c]) for c, p in w["probabilities"].items())
                    assert list(w["probabilities"]) == list(g["probabilities"])  # same classes, same order
                s["max_abs_diff"] = max(s["max_abs_diff"], diff)
    return stats


def compare_logits(run: Path, records: Path, batch: int) -> dict[str, dict[str, float]]:
    """Per task: max |logit difference| and max |logit| between both engines' raw outputs, batch by batch."""
    import torch

    from mmfuse.export.runtime import OnnxPredictor
    from mmfuse.predict import Predictor

    torch_engine, onnx_engine = Predictor(run, device="cpu"), OnnxPredictor(run)
    good, _ = onnx_engine.check(onnx_engine.records_from_file(records, allow_outside_root=True))
    stats = {t: {"max_abs_diff": 0.0, "max_abs_logit": 0.0} for t in torch_engine.model.tasks}
    with torch.inference_mode():
        for start in range(0, len(good), batch):
            chunk = good[start : start + batch]
            (collated,) = list(torch_engine.batches(chunk, len(chunk)))
            want = torch_engine.model(collated["inputs"]).logits
            for name, got in zip(onnx_engine.answers.names, onnx_engine.logits(chunk), strict=True):
                w, s = want[name].numpy(), stats[name]
                s["max_abs_diff"] = max(s["max_abs_diff"], float(abs(w - got).max()))
                s["max_abs_logit"] = max(s["max_abs_logit"], float(abs(w).max()))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--limit", type=int, help="the first N records only (a smoke test)")
    parser.add_argument("--no-logits", action="store_true", help="skip the in-process logit comparison")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = args.out / f"{args.split}.jsonl"
    count = write_records(args.run, args.split, records, args.limit)
    seconds = {e: predict(args.run, records, e, args.out / f"{e}.jsonl", args.batch) for e in ("torch", "onnx")}
    result = {
        "run": str(args.run),
        "split": args.split,
        "records": count,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_s": {e: round(s, 1) for e, s in seconds.items()},
        "answers": compare_answers(args.out / "torch.jsonl", args.out / "onnx.jsonl"),
    }
    if not args.no_logits:
        result["logits"] = compare_logits(args.run, records, args.batch)
    text = json.dumps(result, indent=1)
    (args.out / f"engines_{args.split}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
