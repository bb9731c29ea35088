"""A run streamed from shards, killed inside an epoch, resumed with another number of loader workers: the epoch
still reads each record once (none twice, none lost), through LitData's elastic resume (the order of the rest of
the epoch is the new worker layout's, not the uninterrupted run's).

The processes, the recording and the kill are those of `test_shard_resume` (same tiny shard set: 20 training
records, batches of 4, a checkpoint every 2 steps).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from test_shard_resume import (  # noqa: F401  (the module-scoped `shards` fixture)
    EPOCHS,
    TRAIN,
    _finish,
    _kept,
    _kill,
    _kill_when_blocked,
    _per_epoch,
    _start,
    _steps,
    shards,
)

from mmfuse.train.checkpoints import load_checkpoint

LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR")


def _data(tmp: Path, workers: int) -> list[str]:
    source = ["--set", "data.source=shards", "--set", f"data.path={tmp / 'shards'}"]
    return [*source, "--set", f"data.num_workers={workers}"]


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 0), (0, 2)])
def test_resume_with_another_worker_count_reads_each_record_of_the_epoch_once(
    shards: Path,  # noqa: F811
    before: int,
    after: int,
) -> None:
    tmp = shards
    run, rec = tmp / f"topo{before}{after}", tmp / f"topo{before}{after}.rec"
    last = run / "checkpoints" / "last.ckpt"
    _kill_when_blocked(_start(tmp, ["train", "cfg.yaml", "--out", str(run), *_data(tmp, before)], rec, block_at=3), rec)
    assert (load_checkpoint(last)["epoch"], load_checkpoint(last)["global_step"]) == (0, 2)
    kept = _kept(_steps(rec), last)
    rec.unlink()

    # `--set` on resume changes only what the run allows; the worker count is not part of the model.
    err = _finish(_start(tmp, ["train", "--out", str(run), "--resume", "--set", f"data.num_workers={after}"], rec))
    assert "resuming inside epoch 0 after 2 of its batches" in err
    kept += _steps(rec)

    got = _per_epoch(kept)
    assert len(got) == EPOCHS
    for epoch, batches in enumerate(got):
        seen = sorted(i for b in batches for i in b)
        assert seen == list(range(TRAIN)), f"epoch {epoch}: a record read twice or lost: {batches}"
    state = load_checkpoint(last)
    assert state["epoch"] == EPOCHS - 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def _start_node(tmp: Path, args: list[str], rec: Path, node: int, port: int, block_at: int | None = None) -> Any:
    """One node of a 2-node run on the loopback address (Lightning's NODE_RANK/MASTER_ADDR/MASTER_PORT), recorded."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env |= {"NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return _start(tmp, args, rec, block_at, env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_two_node_run_killed_inside_an_epoch_resumes_each_record_once_across_the_ranks(
    shards: Path,  # noqa: F811
) -> None:
    """2 nodes x batch 2 = the 1-process batch of 4: 10 of the 20 training records a node, 5 steps an epoch. Both
    nodes are killed (SIGKILL) in step 3, after the step-2 checkpoint; both are restarted with --resume. Over the two
    ranks, each epoch holds each record once: LitData's state saved by rank 0 puts every rank back at its place."""
    tmp = shards
    run = tmp / "ddp"
    recs = [tmp / f"ddp{n}.rec" for n in (0, 1)]
    last = run / "checkpoints" / "last.ckpt"
    args = ["train", "cfg.yaml", "--out", str(run), *_data(tmp, 0), "--set", "data.batch_size=2"]
    args += ["--set", "train.num_nodes=2"]
    port = _free_port()
    procs = [_start_node(tmp, args, recs[n], n, port, block_at=3) for n in (0, 1)]
    try:
        for proc, rec in zip(procs, recs):
            _kill_when_blocked(proc, rec)
    finally:
        for proc in procs:
            _kill(proc)
    assert (load_checkpoint(last)["epoch"], load_checkpoint(last)["global_step"]) == (0, 2)
    kept = [s for rec in recs for s in _kept(_steps(rec), last)]
    for rec in recs:
        rec.unlink()

    port = _free_port()
    procs = [_start_node(tmp, ["train", "--out", str(run), "--resume"], recs[n], n, port) for n in (0, 1)]
    errs = [_finish(proc) for proc in procs]
    assert "resuming inside epoch 0 after 2 of its batches" in errs[0]
    kept += [s for rec in recs for s in _steps(rec)]

    for epoch in range(EPOCHS):
        batches = [s["idx"] for s in kept if s["epoch"] == epoch]
        assert all(len(b) == 2 for b in batches) and len(batches) == 2 * 5, batches
        seen = sorted(i for b in batches for i in b)
        assert seen == list(range(TRAIN)), f"epoch {epoch}: a record read twice or lost: {batches}"
    assert load_checkpoint(last)["global_step"] == 5 * EPOCHS
