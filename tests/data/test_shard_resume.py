"""kill -9 inside an epoch of a run streamed from shards, then `train --resume`: the epoch goes on from the streaming
loader's saved position, so each record of it is read once (none twice, none lost), in the uninterrupted run's order;
and after an epoch-end checkpoint the next epoch is read in its own order, not the first epoch's again.

The interrupted run is real `mmfuse train` processes whose training steps are recorded (the record positions of each
batch, `recording`); a process is stopped with SIGKILL while it blocks in a step after a checkpoint was written. The
uninterrupted run is recorded the same way, in the test's process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mmfuse.cli import main
from mmfuse.data.shard_stream import ShardLoader, ShardStream, stream_loader
from mmfuse.data.shards import ShardSamples
from mmfuse.train.checkpoints import load_checkpoint
from mmfuse.train.module import MMFuseModule
from mmfuse.train.run import _warn_mid_epoch
from tiny import kill_when, run_config, write_dataset

SRC = str(Path(__file__).resolve().parents[2] / "src")
TRAIN = 20  # training records of write_dataset(n=40): 5 batches of 4 an epoch
EPOCHS = 2


def recording(rec: str, block_at: int = -1) -> Callable[..., Any]:
    """`MMFuseModule.training_step` that first appends the step's record positions to `rec` (one JSON line); at
    global step `block_at` it writes `rec`.blocked instead and waits to be killed (the checkpoints written before that
    step are on disk)."""
    step = MMFuseModule.training_step

    def recorded(self: MMFuseModule, batch: dict[str, Any], batch_idx: int) -> Any:
        if self.global_step == block_at:
            Path(f"{rec}.blocked").touch()
            time.sleep(600)
        with open(rec, "a") as f:
            f.write(json.dumps({"epoch": self.current_epoch, "step": self.global_step, "idx": batch["index"].tolist()}))
            f.write("\n")
        return step(self, batch, batch_idx)

    return recorded


# `mmfuse ARGV` in a process whose training steps are recorded (`recording`, $REC, $BLOCK_AT).
DRIVER = f"""
import os, sys
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
from test_shard_resume import recording
from mmfuse.cli import main
from mmfuse.data.shard_stream import ShardLoader, ShardStream, stream_loader
from mmfuse.data.shards import ShardSamples
from mmfuse.train.module import MMFuseModule

MMFuseModule.training_step = recording(os.environ["REC"], int(os.environ.get("BLOCK_AT", -1)))
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny data set packed in chunks of ~8 records (several chunks to shuffle), and its config."""
    tmp = tmp_path_factory.mktemp("resume")
    records = write_dataset(tmp / "data", n=40)
    raw = run_config(records, max_epochs=EPOCHS, cache=False, checkpoint_every_n_steps=2)
    raw["data"]["batch_size"] = 4
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["pack", str(tmp / "cfg.yaml"), "--out", str(tmp / "shards"), "--chunk-bytes", "2kB"]) == 0
    assert len(list((tmp / "shards" / "train").glob("chunk-*.bin"))) > 1
    (tmp / "driver.py").write_text(DRIVER)
    return tmp


def _start(
    tmp: Path, args: list[str], rec: Path, block_at: int | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`mmfuse ARGS` recorded to `rec` (DRIVER), in `tmp`, its own process group; `env` (default: this process's)."""
    env = {**(os.environ if env is None else env), "PYTHONWARNINGS": "ignore", "REC": str(rec), "PYTHONPATH": SRC}
    if block_at is not None:
        env["BLOCK_AT"] = str(block_at)
    return subprocess.Popen(
        [sys.executable, str(tmp / "driver.py"), *args],
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the loader workers die with it
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("the run did not finish in time")
    finally:
        _kill(proc)
    assert proc.returncode == 0, err[-3000:]
    return err


def _kill(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_when_blocked(proc: subprocess.Popen[str], rec: Path, timeout: float = 240) -> str:
    """SIGKILL the run (its whole process group) once it blocks in the step it was told to stop at; its stderr."""
    marker = Path(f"{rec}.blocked")
    err = kill_when(proc, marker.exists, "its blocking step", timeout, poll=0.05)
    marker.unlink()
    return err


def _steps(rec: Path) -> list[dict]:
    return [json.loads(line) for line in rec.read_text().splitlines()]


def _kept(steps: list[dict], checkpoint: Path) -> list[dict]:
    """The steps a checkpoint covers: those a killed run took after its last checkpoint are lost with it."""
    done = load_checkpoint(checkpoint)["global_step"]
    return [s for s in steps if s["step"] < done]


def _per_epoch(steps: list[dict]) -> list[list[list[int]]]:
    """[[batch of record positions, ...] for each epoch], in the order read."""
    return [[s["idx"] for s in steps if s["epoch"] == e] for e in range(EPOCHS)]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_inside_an_epoch_then_resume_reads_each_record_of_the_epoch_once(shards: Path, workers: int) -> None:
    tmp = shards
    data = [
        "--set",
        "data.source=shards",
        "--set",
        f"data.path={tmp / 'shards'}",
        "--set",
        f"data.num_workers={workers}",
    ]
    whole, cut = tmp / f"whole{workers}", tmp / f"cut{workers}"
    with pytest.MonkeyPatch.context() as patch:  # the uninterrupted run: in this process, recorded the same way
        patch.setattr(MMFuseModule, "training_step", recording(str(tmp / f"whole{workers}.rec")))
        patch.chdir(tmp)
        assert main(["train", "cfg.yaml", "--out", str(whole), *data]) == 0
    expected = _per_epoch(_steps(tmp / f"whole{workers}.rec"))
    for batches in expected:
        assert sorted(i for b in batches for i in b) == list(range(TRAIN))

    # Killed inside epoch 0: last.ckpt was written after 2 of its 5 steps, the 3rd step ran, the 4th blocks.
    rec, last = tmp / f"cut{workers}.rec", cut / "checkpoints" / "last.ckpt"
    _kill_when_blocked(_start(tmp, ["train", "cfg.yaml", "--out", str(cut), *data], rec, block_at=3), rec)
    ckpt = load_checkpoint(last)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 2)
    assert [s["step"] for s in _steps(rec)] == [0, 1, 2]  # step 2 was read, but the checkpoint does not cover it
    kept = _kept(_steps(rec), last)

    # Resumed, then killed again in epoch 1's first step: last.ckpt is epoch 0's end.
    rec.unlink()
    err = _kill_when_blocked(_start(tmp, ["train", "--out", str(cut), "--resume"], rec, block_at=5), rec)
    assert "resuming inside epoch 0 after 2 of its batches: the streaming loader goes on" in err
    assert (load_checkpoint(last)["epoch"], load_checkpoint(last)["global_step"]) == (0, 5)
    kept += _kept(_steps(rec), last)
    rec.unlink()
    err = _finish(_start(tmp, ["train", "--out", str(cut), "--resume"], rec))
    kept += _steps(rec)

    got = _per_epoch(kept)
    for epoch, batches in enumerate(got):
        seen = sorted(i for b in batches for i in b)
        assert seen == list(range(TRAIN)), f"epoch {epoch}: a record read twice or lost: {batches}"
    assert got == expected  # the uninterrupted run's batches, in its order (epoch 1's order, not epoch 0's again)
    assert "no record of that epoch read twice or skipped" not in err  # this last resume started at an epoch end

    # The same training: the final weights of the uninterrupted run.
    a, b = (load_checkpoint(d / "checkpoints" / "last.ckpt")["state_dict"] for d in (whole, cut))
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.allclose(b[key], value, rtol=1e-5, atol=1e-6), key


def test_only_a_loader_with_a_saved_state_goes_on_inside_the_epoch(caplog: pytest.LogCaptureFixture) -> None:
    """The records loader keeps no state: its resume still warns that the epoch restarts."""
    progress = {"current": {"processed": 3}, "is_last_batch": False}
    streamed = {"epoch": 1, "loops": {"fit_loop": {"epoch_loop.batch_progress": progress, "state_dict": {}}}}
    streamed["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [{"current_epoch": 2, "dataset": {}}]
    records = {"epoch": 1, "loops": {"fit_loop": {"epoch_loop.batch_progress": progress, "state_dict": {}}}}
    with caplog.at_level(logging.INFO, logger="mmfuse"):
        _warn_mid_epoch(streamed, resumable=True)
        _warn_mid_epoch(records, resumable=False)
        _warn_mid_epoch(streamed, resumable=False)  # a state the run's loader cannot take
        _warn_mid_epoch(
            {**streamed, "loops": {"fit_loop": {"epoch_loop.batch_progress": {**progress, "is_last_batch": True}}}},
            True,
        )
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(said) == 3
    assert said[0][0] == logging.INFO and "epoch 1 after 3 of its batches: the streaming loader goes on" in said[0][1]
    for level, message in said[1:]:
        assert level == logging.WARNING and "reads the epoch's first batches again" in message


def test_a_loader_state_saved_for_other_shards_or_another_seed_is_refused(shards: Path, tmp_path: Path) -> None:
    """LitData would find it out inside a loader worker, as a traceback; the run's resume names both sides."""
    samples = ShardSamples({}, {}, "train", train=True)

    def loader(path: Path, seed: int) -> ShardLoader:
        return stream_loader(ShardStream(str(path), samples, True, seed), 4, list, 0)

    first = loader(shards / "shards" / "train", 0)
    next(iter(first))
    state = first.state_dict()
    loader(shards / "shards" / "train", 0).load_state_dict(state)  # the same shards and seed: taken
    with pytest.raises(ValueError, match=r"stopped in .*shards/train \(seed 0\), this run streams .*\(seed 1\)"):
        loader(shards / "shards" / "train", 1).load_state_dict(state)
    shutil.copytree(shards / "shards", tmp_path / "moved")
    with pytest.raises(ValueError, match=f"this run streams {tmp_path / 'moved' / 'train'} "):
        loader(tmp_path / "moved" / "train", 0).load_state_dict(state)
