"""A non-finite loss stops training at the step where it appears, with one line, keeping the last good checkpoint.

The NaN/inf comes from a regression target of 1e30: finite in float32, but its square (the MSE) overflows.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from scaleout import DDP, run_cli

from mmfuse.cli import main
from mmfuse.config import load_config, parse_config
from mmfuse.train.errors import NonFiniteError
from mmfuse.train.run import load_checkpoint, train
from tiny import run_config, write_dataset

HUGE = 1e30


def _split_files(root: Path, bad_rows: tuple[int, ...] = (), value: float = HUGE) -> tuple[Path, Path]:
    """train.jsonl (24 records; `bad_rows` get the target `value`) and val.jsonl (8 records), sharing images/."""
    lines = write_dataset(root, n=32).read_text().splitlines()
    train_rows = [json.loads(line) for line in lines[:24]]
    for i in bad_rows:
        train_rows[i]["size"] = value
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (root / "val.jsonl").write_text("\n".join(lines[24:]) + "\n")
    return root / "train.jsonl", root / "val.jsonl"


def _config(train_file: Path, val_file: Path, **train_opts: object) -> dict:
    cfg = run_config(train_file, **train_opts)
    cfg["data"] = {**cfg["data"], "path": None, "train": str(train_file), "val": str(val_file), "test_fraction": 0.0}
    return cfg


MESSAGE = re.compile(r"non-finite loss at epoch (\d+), step (\d+) \(global step (\d+)\) in task 'size'; ")


def test_non_finite_loss_stops_at_its_step_naming_epoch_step_and_task(tmp_path: Path) -> None:
    train_file, val_file = _split_files(tmp_path / "data", bad_rows=(0,))
    with pytest.raises(NonFiniteError) as err:
        train(parse_config(_config(train_file, val_file)), tmp_path / "run")
    msg = str(err.value)
    match = MESSAGE.search(msg)
    assert match, msg
    assert match.group(1) == "0" and int(match.group(2)) < 3  # 24 records / batch 8: steps 0..2 of epoch 0
    assert "no checkpoint had been written yet" in msg and "\n" not in msg
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "model.safetensors").exists()


def test_overflowing_gradient_norm_stops_naming_the_task(tmp_path: Path) -> None:
    """A target of 1e19: the loss (1e38) is finite in float32, the gradient norm overflows."""
    train_file, val_file = _split_files(tmp_path / "data", bad_rows=(0,), value=1e19)
    with pytest.raises(NonFiniteError) as err:
        train(parse_config(_config(train_file, val_file)), tmp_path / "run")
    msg = str(err.value)
    assert re.search(
        r"non-finite gradient norm \(inf\) at epoch 0, step \d+ \(global step \d+\), from task 'size'", msg
    ), msg


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """Epoch 0 on clean data; resumed on data with a 1e30 target, epoch 1 stops: the checkpoints are untouched."""
    train_file, val_file = _split_files(tmp_path / "data")
    run_dir = tmp_path / "run"
    train(parse_config(_config(train_file, val_file, max_epochs=1)), run_dir)
    ckpts = {name: (run_dir / "checkpoints" / name).read_bytes() for name in ("best.ckpt", "last.ckpt")}
    bad_train, _ = _split_files(tmp_path / "bad", bad_rows=(3, 17))
    cfg = load_config(run_dir / "config.yaml", ["train.max_epochs=2", f"data.train={bad_train}"])
    with pytest.raises(NonFiniteError) as err:
        train(cfg, run_dir, resume=True)
    match = MESSAGE.search(str(err.value))
    assert match and match.group(1) == "1", str(err.value)
    assert f"the last good checkpoint is kept: {run_dir / 'checkpoints' / 'last.ckpt'}" in str(err.value)
    for name, data in ckpts.items():
        assert (run_dir / "checkpoints" / name).read_bytes() == data, f"{name} was overwritten"
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("model.") and v.is_floating_point())


def test_cli_non_finite_loss_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train_file, val_file = _split_files(tmp_path / "data", bad_rows=(5,))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_config(train_file, val_file)))
    capsys.readouterr()
    code = main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")])
    _assert_one_error_line(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), "train", 1)


@pytest.mark.slow
def test_ddp_non_finite_loss_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    """Whichever rank holds the bad record, both ranks stop at the same step (the flags are summed over ranks)."""
    train_file, val_file = _split_files(tmp_path / "data", bad_rows=(5,))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_config(train_file, val_file)))
    args = ["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), *DDP]
    proc = run_cli(args, tmp_path, timeout=240)  # returns only once every rank has exited (they share the pipes)
    _assert_one_error_line(proc, "train", 1)


def _assert_one_error_line(proc, command: str, code: int) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"mmfuse {command}: error: "), proc.stderr[-3000:]
    assert MESSAGE.search(errors[0]), errors[0]
