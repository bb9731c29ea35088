"""`train.steps_per_call`: several optimiser steps per Lightning training step on an all-cached training split. The
runs are those of one step per Lightning step, to the bit: the metrics, every logged row, the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmfuse.cli import main
from tiny import run_config, write_dataset

VARIANTS = {
    "equal, every step logged": ({}, 1),
    "dwa, every 3rd step logged": ({"weighting": {"name": "dwa"}}, 3),
    "uncertainty, bf16-mixed, clipping at 0.5, every 2nd step": (
        {"weighting": {"name": "uncertainty"}, "precision": "bf16-mixed", "grad_clip": 0.5},
        2,
    ),
    "pcgrad + ogm-ge, every 2nd step, a progress bar": (
        {"weighting": {"name": "pcgrad"}, "balance": {"name": "ogm_ge"}, "progress_bar": True},
        2,
    ),
}


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("spc"), n=80)  # 40 training records: 5 steps an epoch at batch 8


def _train(tmp: Path, records: Path, train: dict[str, Any], every: int, steps: str, name: str) -> Path:
    raw = run_config(records, max_epochs=3, log_every_n_steps=every, **train)
    if "balance" in train:
        raw["model"]["fusion"] = {"name": "sum", "output_dim": 16}
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp / name
    assert main(["train", str(cfg), "--out", str(out), "--set", f"train.steps_per_call={steps}"]) == 0
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_several_steps_per_call_train_the_same_run(records: Path, tmp_path: Path, variant: str) -> None:
    train, every = VARIANTS[variant]
    runs = {k: _train(tmp_path, records, train, every, k, f"k{k}") for k in ("1", "auto", "3")}  # 5 = 4+1 = 3+2
    csv = {k: (out / "logs" / "metrics.csv").read_text() for k, out in runs.items()}
    metrics = {k: json.loads((out / "metrics.json").read_text())["metrics"] for k, out in runs.items()}
    weights = {k: load_file(str(out / "model.safetensors")) for k, out in runs.items()}
    assert csv["1"].count("train/loss") >= 1 and len(csv["1"].splitlines()) > 5
    for k in ("auto", "3"):
        assert csv[k] == csv["1"], k  # every row: the same steps, the same values
        assert metrics[k] == metrics["1"], k
        assert weights[k].keys() == weights["1"].keys()
        assert all(torch.equal(weights[k][n], weights["1"][n]) for n in weights["1"]), k


def test_several_steps_per_call_where_batches_are_not_cached_are_refused(
    records: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(run_config(records)))
    out = tmp_path / "run"
    code = main(["train", str(cfg), "--out", str(out), "--set", "train.steps_per_call=2", "--set", "train.cache=false"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.steps_per_call: 2 needs the training inputs all from the feature cache" in err[0]
    code = main(["train", str(cfg), "--out", str(out), "--set", "train.steps_per_call=2", "--set",
                 "train.checkpoint_every_n_steps=3"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.steps_per_call" in err[0] and "checkpoint_every_n_steps" in err[0]
