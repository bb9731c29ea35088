"""Tiny configs and data shared by the model, config and end-to-end tests (random weights, tiny sizes)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def tiny_model(fusion: str = "concat", freeze: bool = True, **fusion_opts: Any) -> dict[str, Any]:
    return {
        "encoders": {
            "image": {"name": "torchvision", "model": "resnet18", "image_size": 32, "freeze": freeze},
            "text": {"name": "hf_text", "config": TINY_BERT, "max_length": 16, "freeze": freeze},
        },
        "fusion": {"name": fusion, "output_dim": 16, **fusion_opts},
    }


COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_dataset(root: Path, n: int = 40, seed: int = 0) -> Path:
    """A tiny records file: coloured squares, a text, a multiclass, a binary, a regression and a multilabel task.

    The colour is in the image; `is_question` is in the text; some labels are missing (masked).
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    lines = []
    for i in range(n):
        color = names[i % 3]
        arr = np.full((24, 24, 3), COLORS[color], dtype=np.uint8)
        arr[rng.integers(0, 12) :, : rng.integers(12, 24)] //= 2
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
        question = bool(i % 2)
        rec = {
            "image": f"images/{i}.png",
            "text": "is this a square?" if question else "a square of colour",
            "color": color if i % 7 else None,  # missing label: masked
            "is_question": int(question),
            "size": float(rng.normal()),
            "tags": "bright|square" if i % 3 == 0 else "square",
        }
        lines.append(json.dumps(rec))
    path = root / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_config(records: Path, **train: Any) -> dict[str, Any]:
    return {
        "name": "tiny",
        "seed": 0,
        "model": tiny_model(),
        "tasks": {
            "color": {"kind": "multiclass"},
            "is_question": {"kind": "binary"},
            "size": {"kind": "regression"},
            "tags": {"kind": "multilabel"},
        },
        "data": {
            "source": "records",
            "path": str(records),
            "val_fraction": 0.25,
            "test_fraction": 0.25,
            "batch_size": 8,
            "eval_batch_size": 16,
            "num_workers": 0,
        },
        # MMFUSE_TEST_ACCELERATOR=gpu runs the end-to-end tests on a GPU machine.
        "train": {
            "max_epochs": 2,
            "lr": 0.01,
            "accelerator": os.environ.get("MMFUSE_TEST_ACCELERATOR", "cpu"),
            "progress_bar": False,
            **train,
        },
    }


def one_batch_config(records: Path, tasks: dict[str, Any] | None = None, **train: Any) -> dict[str, Any]:
    """`run_config` at batch 32, more than the 20 training records: one batch an epoch, whatever the order (so a
    streamed and an in-memory run take the same steps)."""
    raw = run_config(records, max_epochs=2, **train)
    raw["data"]["batch_size"] = 32
    raw["tasks"].update(tasks or {})
    return raw


def write_config(tmp: Path, raw: dict[str, Any]) -> Path:
    """`raw` as the next free `tmp/cN.yaml`."""
    import yaml

    path = tmp / f"c{len(list(tmp.glob('c*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def kill_when(proc: Any, ready: Any, what: str, timeout: float = 240, poll: float = 0.01) -> str:
    """SIGKILL `proc`'s whole process group (started with `start_new_session=True`, stderr piped) as soon as
    `ready()` is true; its stderr. Fails the test if the process ends first or `timeout` seconds pass."""
    import signal
    import time

    import pytest

    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (code {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout}s")
            time.sleep(poll)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    assert proc.returncode == -signal.SIGKILL
    return err
