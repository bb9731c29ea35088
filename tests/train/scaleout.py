"""Helpers for the scale-out tests: a partially labelled dataset and a CLI runner under a watchdog.

Every subprocess runs in its own session; on timeout the whole process group (DDP children
included) is killed and the test fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tiny import COLORS, tiny_model

SRC = str(Path(__file__).resolve().parents[2] / "src")

# Which validation/test positions carry a label, per task. Under 2-process DDP, rank r evaluates
# positions r, r + 2, ...: `color` is labelled on rank 0's shard only, `flag` on rank 1's only,
# `size` on two records of rank 0, one of them (position 0) the record that DDP's default sampler repeats
# on rank 1, `tags` on two records of rank 0 (position 10: the last, odd-count record).
EVAL_LABELLED = {"color": {0, 2, 4}, "flag": {1, 3, 5}, "size": {0, 6}, "tags": {8, 10}}
EVAL_SIZE = 11  # odd: DDP's default sampler would repeat a record to even the shards


def write_partial_dataset(root: Path, n_train: int = 48, seed: int = 0) -> Path:
    """A records file with an explicit split field; in val/test each task is labelled on a few records only.

    In train every task is labelled on about 40% of the records.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    lines = []
    plan = [("train", i) for i in range(n_train)] + [(s, i) for s in ("val", "test") for i in range(EVAL_SIZE)]
    for k, (split, pos) in enumerate(plan):
        color = names[k % 3]
        arr = np.full((24, 24, 3), COLORS[color], dtype=np.uint8)
        arr[rng.integers(0, 12) :, : rng.integers(12, 24)] //= 2
        Image.fromarray(arr).save(root / "images" / f"{k}.png")
        question = bool((k // 2) % 2)

        draw = rng.random(4)  # per task: labelled on about 40% of the training records
        labelled = {
            task: bool(draw[i] < 0.4) if split == "train" else pos in EVAL_LABELLED[task]
            for i, task in enumerate(EVAL_LABELLED)
        }
        rec: dict[str, Any] = {
            "image": f"images/{k}.png",
            "text": "is this a square?" if question else "a square of colour",
            "split": split,
            "color": color if labelled["color"] else None,
            "flag": int(question) if labelled["flag"] else None,
            "size": float(rng.normal()) + (1.0 if color == "red" else 0.0) if labelled["size"] else None,
            "tags": ("bright|square" if k % 3 == 0 else "square") if labelled["tags"] else None,
        }
        lines.append(json.dumps(rec))
    path = root / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def partial_config(records: Path, **train: Any) -> dict[str, Any]:
    return {
        "name": "partial",
        "seed": 0,
        "model": tiny_model(),
        "tasks": {
            "color": {"kind": "multiclass"},
            "flag": {"kind": "binary"},
            "size": {"kind": "regression"},
            "tags": {"kind": "multilabel"},
        },
        "data": {"source": "records", "path": str(records), "batch_size": 8, "eval_batch_size": 4, "num_workers": 0},
        "train": {"max_epochs": 2, "lr": 0.01, "accelerator": "cpu", "progress_bar": False, **train},
    }


DDP = ["--set", "train.devices=2", "--set", "train.strategy=ddp", "--set", "train.accelerator=cpu"]


def cli_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([SRC, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`python -m mmfuse.cli ARGS` in its own process group; killed (all of it) and failed on timeout."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmfuse.cli", *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"mmfuse {' '.join(args)} did not finish within {timeout}s (hung?)\n{err[-3000:]}")
    finally:
        kill_group(proc)  # no DDP child may outlive the test
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
