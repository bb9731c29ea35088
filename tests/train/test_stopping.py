"""`train.early_stopping` and `train.time_limit` through the CLI: the run stops after the right epoch, keeps its
best checkpoint, says why in metrics.json and report.md, refuses bad values with one line, and resumes (the early
stopping counter comes back from the checkpoint; the time limit counts each session's fit only).

A plateau that needs no luck: accuracy lies in [0, 1], so with `min_delta: 1` no epoch after the first improves."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmfuse.cli import main
from tiny import run_config, write_dataset

PLATEAU = {"patience": 2, "min_delta": 1.0}
MONITOR = "val/color/accuracy"  # the tiny config's default monitor: its first task's default metric


def _config(root: Path, **train: Any) -> Path:
    records = write_dataset(root / "data", n=24)
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(run_config(records, **train)))
    return path


def _epochs(run: Path) -> list[int]:
    """The epochs metrics.csv holds a validation row for."""
    with open(run / "logs" / "metrics.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f) if r.get(MONITOR)]


def _stopped(run: Path) -> tuple[int, str]:
    summary = json.loads((run / "metrics.json").read_text())
    report = [line for line in (run / "report.md").read_text().splitlines() if line.startswith("- stopped: ")]
    assert report == [f"- stopped: {summary['stop_reason']}"]
    return summary["epochs"], summary["stop_reason"]


@pytest.mark.parametrize("via", ["yaml", "set"])
def test_early_stopping_stops_after_patience_epochs_without_improvement(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, via: str
) -> None:
    if via == "yaml":
        cfg, sets, patience = _config(tmp_path, max_epochs=6, early_stopping=PLATEAU), [], 2
    else:
        cfg, patience = _config(tmp_path, max_epochs=6), 1
        sets = ["--set", "train.early_stopping.patience=1", "--set", "train.early_stopping.min_delta=1"]
    with caplog.at_level(logging.INFO, logger="mmfuse"):
        assert main(["train", str(cfg), "--out", str(tmp_path / "run"), *sets]) == 0
    run = tmp_path / "run"
    assert _epochs(run) == list(range(patience + 1))  # epoch 1 sets the best; `patience` epochs do not improve on it
    epochs = "2 epochs" if patience == 2 else "1 epoch"
    assert _stopped(run) == (
        patience + 1,
        f"early_stopping (no improvement of {MONITOR} greater than 1 for {epochs} after epoch 1)",
    )
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "model.safetensors").is_file()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped after epoch")]
    assert said == [f"stopped after epoch {patience + 1}: {_stopped(run)[1]}"]  # the CLI shows it


def test_a_run_that_is_not_stopped_says_max_epochs(tmp_path: Path) -> None:
    cfg = _config(tmp_path, max_epochs=2, early_stopping={"patience": 3}, time_limit=3600)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0
    assert _epochs(tmp_path / "run") == [0, 1]
    assert _stopped(tmp_path / "run") == (2, "max_epochs")


def test_time_limit_stops_after_the_epoch_that_crosses_it_and_resume_counts_this_session(tmp_path: Path) -> None:
    cfg = _config(tmp_path, max_epochs=4)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--set", "train.time_limit=1e-6"]) == 0
    assert _epochs(run) == [0]  # the first epoch is finished (validated, checkpointed), never cut
    assert _stopped(run) == (1, "time_limit (1e-06 s reached after epoch 1)")
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "model.safetensors").is_file()
    assert json.loads((run / "metrics.json").read_text())["best_checkpoint"] == "checkpoints/best.ckpt"
    # The first session's time is not carried over: a resume trains one more epoch before its own limit.
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert _epochs(run) == [0, 1]
    assert _stopped(run) == (2, "time_limit (1e-06 s reached after epoch 2)")


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        ("train.time_limit=0", "train.time_limit: must be > 0 seconds (got 0)"),
        ("train.time_limit=-5", "train.time_limit: must be > 0 seconds (got -5)"),
        (
            "train.early_stopping.patience=0",
            "train.early_stopping.patience: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            "train.early_stopping.min_delta=-0.1",
            "train.early_stopping.min_delta: Input should be greater than or equal to 0 (got -0.1)",
        ),
        ("train.early_stopping.patience=true", "train.early_stopping.patience: Input should be a valid integer"),
        ("train.early_stopping.wait=3", "train.early_stopping.wait: unknown key; allowed: patience, min_delta"),
        (
            "data.val_fraction=0",
            "train.early_stopping: needs validation records to monitor, and the data has none "
            "(set data.val_fraction > 0 or data.val, or leave train.early_stopping out)",
        ),
    ],
)
def test_bad_stopping_settings_are_one_line_before_any_training(
    tmp_path: Path, capsys: pytest.CaptureFixture, setting: str, line: str
) -> None:
    cfg = _config(tmp_path, early_stopping=PLATEAU)
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--set", setting]) == 2
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if "error:" in x]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"mmfuse train: error: {line}"), errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-epoch run with early stopping on a plateau (patience 2): one epoch without improvement."""
    root = tmp_path_factory.mktemp("stopping")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))
        cfg = _config(root, max_epochs=2, early_stopping=PLATEAU)
        assert main(["train", str(cfg), "--out", str(root / "run")]) == 0
    assert _stopped(root / "run") == (2, "max_epochs")
    return root / "run"


@pytest.mark.parametrize(
    ("sets", "epochs", "reason"),
    [
        # the counter comes back (1 epoch without improvement): one more makes 2 = patience
        ([], 3, "no improvement of val/color/accuracy greater than 1 for 2 epochs after epoch 1"),
        # the patience is the config's, not the checkpoint's
        (
            ["train.early_stopping.patience=3"],
            4,
            "no improvement of val/color/accuracy greater than 1 for 3 epochs after epoch 1",
        ),
    ],
)
def test_resume_keeps_the_early_stopping_counter(
    two_epochs: Path, tmp_path: Path, sets: list[str], epochs: int, reason: str
) -> None:
    run = Path(shutil.copytree(two_epochs, tmp_path / "run"))
    sets = [x for s in ["train.max_epochs=8", *sets] for x in ("--set", s)]
    assert main(["train", "--out", str(run), "--resume", *sets]) == 0
    assert _epochs(run) == list(range(epochs))
    assert _stopped(run) == (epochs, f"early_stopping ({reason})")


def test_resume_turns_early_stopping_on_and_off(finished: Path, two_epochs: Path, tmp_path: Path) -> None:
    on = Path(shutil.copytree(finished, tmp_path / "on"))  # trained without early stopping (config.yaml: null)
    sets = ["train.max_epochs=8", "train.early_stopping.patience=1", "train.early_stopping.min_delta=1"]
    assert main(["train", "--out", str(on), "--resume", *[x for s in sets for x in ("--set", s)]]) == 0
    assert _stopped(on) == (4, f"early_stopping (no improvement of {MONITOR} greater than 1 for 1 epoch after epoch 3)")
    off = Path(shutil.copytree(two_epochs, tmp_path / "off"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        argv = ["--verbose", "train", "--out", str(off), "--resume", "--set", "train.max_epochs=4"]  # warnings shown
        assert main([*argv, "--set", "train.early_stopping=null"]) == 0
    assert _stopped(off) == (4, "max_epochs")
    assert not [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)]
