"""`checkpoints/last.ckpt` holds the last finished epoch, whatever the monitor did, and every N steps when asked.

Lightning's `save_last` wrote `last.ckpt` only on epochs that improved the monitor: a run killed after its best
epoch resumed from the best epoch and trained every later epoch again.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from scaleout import cli_env, run_cli

from mmfuse.cli import main
from mmfuse.train import checkpoints
from mmfuse.train.run import load_checkpoint
from tiny import kill_when, run_config, write_dataset

EPOCHS = 5


def _kill_after_writes(args: list[str], cwd: Path, last: Path, writes: int, timeout: float = 240) -> str:
    """Start `mmfuse ARGS`, SIGKILL its process group once `last` has been (atomically) replaced `writes` times.

    Returns:
        The killed process's stderr.
    """

    def inode() -> int | None:
        try:
            return last.stat().st_ino
        except FileNotFoundError:
            return None

    proc = subprocess.Popen(
        [sys.executable, "-m", "mmfuse.cli", *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen, count = inode(), 0

    def written() -> bool:
        nonlocal seen, count
        now = inode()
        if now is not None and now != seen:
            seen, count = now, count + 1
        return count >= writes

    return kill_when(proc, written, f"{writes} writes of {last.name}", timeout, poll=0.002)


def _epochs_trained(stderr: str) -> list[int]:
    """The 0-based epochs a process finished, from its one-line-per-epoch progress ("epoch 3/5: ...")."""
    return [int(m) - 1 for m in re.findall(rf"^epoch (\d+)/{EPOCHS}:", stderr, flags=re.M)]


def _csv(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_kill_9_twice_after_the_best_epoch_resumes_from_the_last_epoch(tmp_path: Path) -> None:
    records = write_dataset(tmp_path / "data", n=40)
    # The frozen tiny encoders cannot learn `is_question` here: its accuracy is flat, so the best epoch is the first.
    cfg = run_config(
        records, max_epochs=EPOCHS, progress_bar=True, log_every_n_steps=1, monitor="val/is_question/accuracy"
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(whole)]) == 0
    best_epoch = load_checkpoint(whole / "checkpoints" / "best.ckpt")["epoch"]
    assert best_epoch < 2, "this seed's best epoch must come early for the kills below to fall after it"

    last = cut / "checkpoints" / "last.ckpt"
    first = _kill_after_writes(["train", "cfg.yaml", "--out", str(cut)], tmp_path, last, writes=3)
    assert load_checkpoint(last)["epoch"] == 2 > load_checkpoint(cut / "checkpoints" / "best.ckpt")["epoch"]
    assert _epochs_trained(first)[:3] == [0, 1, 2]

    second = _kill_after_writes(["train", "--out", str(cut), "--resume"], tmp_path, last, writes=1)
    assert load_checkpoint(last)["epoch"] == 3
    assert _epochs_trained(second)[:1] == [3]  # went on from epoch 3: no epoch trained twice

    proc = run_cli(["train", "--out", str(cut), "--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _epochs_trained(proc.stderr) == [4]

    # Every epoch once in the history, with the uninterrupted run's values; the same final and best weights.
    assert _csv(cut) == _csv(whole)
    assert {int(r["epoch"]) for r in _csv(cut) if "val/color/accuracy" in r} == set(range(EPOCHS))
    a, b = (load_checkpoint(d / "checkpoints" / "last.ckpt") for d in (whole, cut))
    assert a["epoch"] == b["epoch"] == EPOCHS - 1
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][key], value), key
    assert (cut / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert json.loads((cut / "metrics.json").read_text())["epochs"] == EPOCHS


def test_last_ckpt_is_written_every_epoch_and_every_n_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """3 training batches an epoch, `train.checkpoint_every_n_steps=2`: last.ckpt at steps 2, 3 (epoch 0's end),
    4, 6 (epoch 1's end: no step save at an epoch's last batch, where the epoch-end save follows); each write
    goes to a temporary file renamed over last.ckpt."""
    records = write_dataset(tmp_path / "data", n=40)  # 20 training records, batches of 8
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(run_config(records, max_epochs=2, checkpoint_every_n_steps=2)))
    saved: list[tuple[str, int, int, bool]] = []
    original = checkpoints.TorchCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):  # type: ignore[no-untyped-def]
        saved.append((Path(path).name, checkpoint["global_step"], checkpoint["epoch"], Path(path).exists()))
        original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(checkpoints.TorchCheckpointIO, "save_checkpoint", record)
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 0
    temporary = re.compile(r"\.last\.ckpt\.\d+\.[0-9a-f]{8}\.tmp")  # mmfuse.io.atomic_path's name: per writer
    lasts = [(step, epoch) for name, step, epoch, _ in saved if temporary.fullmatch(name)]
    assert lasts == [(2, 0), (3, 0), (4, 1), (6, 1)]
    assert all(name.startswith(".") and name.endswith(".tmp") for name, *_ in saved)  # never the target itself
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_checkpoint_every_n_steps_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = write_dataset(tmp_path / "data", n=8)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(run_config(records)))
    capsys.readouterr()
    argv = [
        "train",
        str(tmp_path / "cfg.yaml"),
        "--out",
        str(tmp_path / "run"),
        "--set",
        "train.checkpoint_every_n_steps=0",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.checkpoint_every_n_steps" in err and "Traceback" not in err
