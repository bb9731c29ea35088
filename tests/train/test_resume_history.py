"""kill -9 in the middle of an epoch, then `train --resume`: the same final metrics as an uninterrupted run,
and logs/metrics.csv, curves.png and report.md cover every epoch exactly once."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scaleout import cli_env, run_cli

from mmfuse.train.history import HistoryCSVLogger
from mmfuse.train.run import load_checkpoint
from tiny import kill_when, run_config, write_dataset

EPOCHS = 3


def _rows(run_dir: Path) -> dict[tuple[int, int, str], float]:
    """{(epoch, step, key): value} of every value in logs/metrics.csv; fails on a value logged twice."""
    out: dict[tuple[int, int, str], float] = {}
    with open(run_dir / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and key not in ("epoch", "step"):
                    where = (int(float(row["epoch"])), int(float(row["step"])), key)
                    assert where not in out, f"{where} logged twice"
                    out[where] = float(value)
    return out


def _kill_after_first_checkpoint(args: list[str], cwd: Path, run_dir: Path, timeout: float = 240) -> int:
    """Start `mmfuse ARGS`, SIGKILL its whole process group as soon as checkpoints/last.ckpt exists; its epoch."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmfuse.cli", *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    kill_when(proc, last.exists, "first checkpoint", timeout, poll=0.005)
    return int(load_checkpoint(last)["epoch"])


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_keeps_the_whole_history(tmp_path: Path) -> None:
    records = write_dataset(tmp_path / "data", n=160)  # 80 training records: 10 steps an epoch
    cfg = run_config(records, max_epochs=EPOCHS, log_every_n_steps=2, balance={"name": "ogm_ge", "noise": False})
    cfg["model"]["fusion"]["adapters"] = True  # frozen encoders: OGM-GE acts on the fusion's per-modality adapters
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = run_cli(["train", str(tmp_path / "cfg.yaml"), "--out", str(whole)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed_at = _kill_after_first_checkpoint(["train", str(tmp_path / "cfg.yaml"), "--out", str(cut)], tmp_path, cut)
    assert killed_at < EPOCHS - 1 and not (cut / "metrics.json").exists()  # interrupted before the end
    proc = run_cli(["train", "--out", str(cut), "--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The same final metrics as the uninterrupted run.
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, cut))
    assert a["epochs"] == b["epochs"] == EPOCHS
    for split in ("val", "test"):
        for task, metrics in a["metrics"][split].items():
            for name, value in metrics.items():
                assert math.isclose(b["metrics"][split][task][name], value, rel_tol=1e-6, abs_tol=1e-7), (task, name)

    # Every logged value once, the same as the uninterrupted run's, every epoch present.
    rows_a, rows_b = _rows(whole), _rows(cut)
    assert set(rows_b) == set(rows_a)
    for where, value in rows_a.items():
        assert math.isclose(rows_b[where], value, rel_tol=1e-6, abs_tol=1e-7), where
    assert {e for e, _, k in rows_b if k.startswith("val/")} == set(range(EPOCHS))
    assert {e for e, _, k in rows_b if k == "train/loss"} == set(range(EPOCHS))

    # The report's per-epoch table has each epoch once, and the curves were drawn.
    report = (cut / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [int(line.split("|")[1]) for line in table] == list(range(EPOCHS))
    assert table == [line for line in (whole / "report.md").read_text().splitlines() if line in table]
    assert (cut / "curves.png").stat().st_size > 0


def test_history_logger_keeps_rows_across_flushes_and_new_columns(tmp_path: Path) -> None:
    """A resumed logger starts from the checkpoint's rows, drops what the file held beyond them, and adds columns."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("epoch,step,stale\n9,99,1.0\n")  # rows the checkpoint lacks
    logger = HistoryCSVLogger(tmp_path, rows=[{"epoch": 0, "step": 4, "val/a": 0.5}])
    logger.log_metrics({"epoch": 1, "train/loss": 2.0}, step=5)
    logger.save()
    logger.log_metrics({"epoch": 1, "train/loss": 1.5}, step=6)
    logger.save()  # appended
    logger.log_metrics({"epoch": 1, "val/a": 0.75, "val/b": 3.0}, step=7)
    logger.save()  # a new column: rewritten
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = [{k: v for k, v in r.items() if v} for r in csv.DictReader(f)]
    assert rows == [
        {"epoch": "0", "step": "4", "val/a": "0.5"},
        {"epoch": "1", "step": "5", "train/loss": "2.0"},
        {"epoch": "1", "step": "6", "train/loss": "1.5"},
        {"epoch": "1", "step": "7", "val/a": "0.75", "val/b": "3.0"},
    ]
    assert logger.rows[-1] == {"epoch": 1, "val/a": 0.75, "val/b": 3.0, "step": 7}
