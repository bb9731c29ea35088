"""6. inference: `mmfuse predict` (mmfuse.predict.Predictor, model loaded once) vs the bare model forward.

A run directory is made first with `train()` on a small config (the reference model, frozen encoders,
128 records, 1 epoch). Then, on easy-VQA test records:
- latency: `Predictor.predict([record])` (validation, image decoding, preprocessing, collation, forward,
  probabilities per class) vs the model's forward on that record pre-collated;
- throughput: a JSONL batch file read with `read_records` (as `mmfuse predict --input` does) and predicted
  at batch 64 vs the forward on the same records pre-collated in batches of 64.
The CLI's wall time (a new process: imports and model load included) is reported for information.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import (
    Result,
    Row,
    Settings,
    collate_batches_of,
    easy_vqa_splits,
    fmt,
    interleave,
    loop_runner,
    model_config,
    side_row,
    to_device,
)

PREDICT_BATCH = 64


def make_run(s: Settings) -> tuple[Path, float]:
    from mmfuse.config import parse_config
    from mmfuse.train.run import train

    cfg = parse_config(
        model_config(
            True,
            device=s.device,
            data={"limit": 128},
            train={"max_epochs": 1, "cache_dir": str(s.workdir / "fc"), "log_every_n_steps": 1},
        )
    )
    t0 = time.perf_counter()
    train(cfg, s.workdir / "run")
    return s.workdir / "run", time.perf_counter() - t0


def run(s: Settings) -> Result:
    from mmfuse.data.records import Record
    from mmfuse.predict import Predictor

    run_dir, train_s = make_run(s)
    t0 = time.perf_counter()
    predictor = Predictor(run_dir, device=str(s.device))
    load_s = time.perf_counter() - t0
    model = predictor.model
    n = 64 if s.quick else 256
    test = [Record(r.inputs, {}, r.source) for r in easy_vqa_splits()["test"][:n]]
    batch_file = s.workdir / "records.jsonl"
    batch_file.write_text("".join(json.dumps(r.inputs) + "\n" for r in test))
    one = collate_batches_of(model, test[:1], 1)
    full = collate_batches_of(model, test, PREDICT_BATCH)

    def forward(batches: list[dict[str, Any]]) -> Any:
        def step(i: int) -> None:
            with torch.inference_mode():
                model(to_device(batches[i % len(batches)]["inputs"], s.device))

        return step

    def predict_file(i: int) -> None:
        records, _ = predictor.check(predictor.records_from_file(batch_file, allow_outside_root=True))
        predictor.predict(records, PREDICT_BATCH)

    latency = interleave(
        {
            "predict": loop_runner(lambda i: predictor.predict(predictor.check([test[i % len(test)]])[0], 1), s.device),
            "forward": loop_runner(forward(one), s.device),
        },
        1,
        s.rounds(3),
        2,
        s.steps(10, 3),
    )
    throughput = interleave(
        {
            "predict": loop_runner(predict_file, s.device),
            "forward": loop_runner(_all(forward(full), len(full)), s.device),
        },
        n,
        s.rounds(3),
        1,
        s.steps(2, 1),
    )
    lp, lf = latency["predict"].median, latency["forward"].median
    tp, tf = throughput["predict"], throughput["forward"]
    res = Result("inference")
    res.rows = [
        Row(
            "latency: Predictor.predict, one record",
            1000 * lp,
            "ms",
            f"{fmt(lp / lf)}x the forward",
            "validate + decode + preprocess + collate + forward + probabilities",
        ),
        Row("latency: bare model forward, one pre-collated record", 1000 * lf, "ms"),
        side_row(
            f"throughput: predict a JSONL file of {n} records, batch {PREDICT_BATCH}",
            tp,
            vs=f"{fmt(tp.per_second / tf.per_second)}x the forward",
        ),
        side_row(f"throughput: bare forward, pre-collated batches of {PREDICT_BATCH}", tf),
        Row("one-off: Predictor(run_dir) load", load_s, "s"),
        Row("one-off: train() the small run directory", train_s, "s", "", "128 records, 1 epoch, frozen + cached"),
    ]
    if not s.quick:
        res.rows += cli_rows(run_dir, batch_file, test[0], s)
    res.info = {
        "latency_s": {k: v.times for k, v in latency.items()},
        "throughput_s": {k: v.times for k, v in throughput.items()},
    }
    return res


def _all(step: Any, n_batches: int) -> Any:
    """One timed unit = a pass over all the batches (as one predict call covers the whole file)."""

    def unit(i: int) -> None:
        for b in range(n_batches):
            step(b)

    return unit


def cli_rows(run_dir: Path, batch_file: Path, record: Any, s: Settings) -> list[Row]:
    exe = [sys.executable, "-m", "mmfuse.cli"]  # what the `mmfuse` entry point runs, found on any PYTHONPATH
    rows = []
    for what, args in (
        ("one record", ["--image", record.inputs["image"], "--text", record.inputs["text"]]),
        (
            f"file of {sum(1 for _ in open(batch_file))} records",
            ["--input", str(batch_file), "--allow-outside-root", "--output", str(s.workdir / "preds.jsonl")],
        ),
    ):
        t0 = time.perf_counter()
        proc = subprocess.run([*exe, "predict", str(run_dir), *args], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        note = (
            "new process: imports + model load + predict" if proc.returncode == 0 else f"failed: {proc.stderr[-200:]}"
        )
        rows.append(Row(f"CLI wall time: mmfuse predict, {what}", wall, "s", "", note))
    return rows
