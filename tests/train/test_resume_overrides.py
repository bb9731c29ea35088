"""`train --resume --set KEY=VALUE`: what may change (how long, what is reported) is applied; anything else
(lr, optimizer, model, tasks, data, seed) is refused with one line, and config.yaml keeps the values in effect."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest

from mmfuse.cli import main
from mmfuse.config import ConfigError, load_config
from mmfuse.runs import RESUME_MAY_CHANGE, check_resume_changes
from mmfuse.train.run import load_checkpoint


@pytest.fixture
def run_dir(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.mark.parametrize(
    ("setting", "key", "shown"),
    [
        ("train.lr=1e30", "train.lr", "(was 0.01, asked 1e+30)"),
        ("train.optimizer=sgd", "train.optimizer", '(was "adamw", asked "sgd")'),
        ("model.fusion.output_dim=8", "model.fusion.output_dim", "(was 16, asked 8)"),
        ("data.batch_size=4", "data.batch_size", "(was 8, asked 4)"),
        ("seed=3", "seed", "(was 0, asked 3)"),
        ("tasks.size.weight=2", "tasks.size.weight", "(was 1.0, asked 2.0)"),
    ],
)
def test_resume_refuses_a_change_of_what_the_run_learns(
    run_dir: Path, capsys: pytest.CaptureFixture, setting: str, key: str, shown: str | None
) -> None:
    before = {p: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "checkpoints" / "last.ckpt")}
    capsys.readouterr()
    assert main(["train", "--out", str(run_dir), "--resume", "--set", setting]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    if shown is None:  # a key the schema may not have: refused either way, by the schema or by resume
        assert key.split(".")[-1] in lines[0]
    else:
        assert lines[0] == f"mmfuse train: error: --resume cannot change {key} {shown}: start a new run instead"
    assert {p: p.read_bytes() for p in before} == before  # nothing recorded, nothing trained


def test_resume_applies_a_longer_max_epochs_and_the_progress_setting(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mmfuse"):
        argv = ["train", "--out", str(run_dir), "--resume", "--set", "train.max_epochs=3"]
        assert main([*argv, "--set", "train.progress_bar=true", "--set", "train.log_every_n_steps=1"]) == 0
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("epoch ")] == [
        "epoch 3/3"
    ]  # only the new epoch was trained, and the progress setting took effect
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 2
    saved = load_config(run_dir / "config.yaml").train
    assert (saved.max_epochs, saved.progress_bar, saved.log_every_n_steps) == (3, True, 1)
    with open(run_dir / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f)]
    assert sorted(int(r["epoch"]) for r in rows if r.get("val/color/accuracy")) == [0, 1, 2]
    steps = sorted(int(r["step"]) for r in rows if r.get("train/loss") and int(r["epoch"]) == 2)
    assert steps == list(range(steps[0], steps[0] + len(steps))) and len(steps) > 1  # logged every step


def test_the_allowed_keys_exist_and_everything_else_is_refused(finished: Path) -> None:
    saved = load_config(finished / "config.yaml")
    for key in sorted(RESUME_MAY_CHANGE):
        shown = {"train.max_epochs": 9, "train.progress_bar": True, "train.cache_dir": "/tmp/x"}
        value = {**shown, "train.early_stopping": "{patience: 2}"}.get(key, 7)
        check_resume_changes(saved, load_config(finished / "config.yaml", [f"{key}={value}"]))
    with pytest.raises(ConfigError, match="train.encoder_lr"):
        check_resume_changes(saved, load_config(finished / "config.yaml", ["train.encoder_lr=0.5"]))
