"""Two nodes on one machine (`train.num_nodes=2`, one CPU process a node, gloo over the loopback address) train as one
process with the same global batch does; a launcher whose process count disagrees with the config is refused.

Why the metrics agree: every training record carries every label and the per-process batch is half the 1-process
batch. Then each global batch holds the same records in both runs (`EpochDistributedSampler` deals out the 1-process
`EpochRandomSampler`'s permutation of (seed, epoch): rank r takes positions r, r + 2, ... so two half batches are
one 1-process batch, at any seed), and DDP's average of the two half-batch mean losses' gradients is the whole
batch's mean-loss gradient. What differs is float32 summation order (the gloo all-reduce, two partial sums): 1e-5
relative leaves two orders of magnitude over the ~1e-7 seen here, while one batch-size change moves the metrics by
0.1 to 1.

Each node is its own process group (session), killed whole when the test times out.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmfuse.builders import OptimOptions, TrainOptions
from mmfuse.cli import main
from mmfuse.config import ConfigError
from mmfuse.train.run import build_trainer, load_checkpoint
from tiny import COLORS, run_config, write_dataset

SRC = str(Path(__file__).resolve().parents[2] / "src")
TOL = 1e-5
LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR")


def _fully_labelled(root: Path) -> Path:
    """The tiny data set with the colour label on every record (a masked label would weigh the two half batches
    unequally: each process averages its loss over its own labelled rows)."""
    records = write_dataset(root, n=40)
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["color"] = list(COLORS)[i % 3]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("multinode")
    cache = root / "feature-cache"
    records = _fully_labelled(root / "data")
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(run_config(records, max_epochs=2)))  # 20 training records, batch 8
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_CACHE_DIR", str(cache))
        assert main(["train", str(cfg), "--out", str(root / "one")]) == 0
    return {"root": root, "cfg": cfg, "cache": cache}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_nodes(commands: list[tuple[list[str], dict[str, str]]], cwd: Path, timeout: float = 240) -> list[str]:
    """Start one process per node (its own session), wait for all; their stderr. Fails, killing all, on timeout."""
    procs = []
    for argv, env in commands:
        full = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS} | {"PYTHONWARNINGS": "ignore", **env}
        full["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        procs.append(subprocess.Popen(argv, cwd=cwd, env=full, start_new_session=True, **pipes))
    errs = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=timeout)
            errs.append(err)
            assert proc.returncode == 0, err[-3000:]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a node did not finish within {timeout}s (hung?)")
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return errs


def _torchrun(train_args: list[str], port: int) -> list[tuple[list[str], dict[str, str]]]:
    """`torchrun --nnodes 2 --node_rank N --nproc_per_node 1` on the loopback address, once per node."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    where = ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [([*launch, "--node_rank", str(n), *where, "-m", "mmfuse.cli", *train_args], {}) for n in (0, 1)]


def _lightning_env(train_args: list[str], port: int) -> list[tuple[list[str], dict[str, str]]]:
    """The same command on every node, with Lightning's variables: NODE_RANK, MASTER_ADDR, MASTER_PORT."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return [([sys.executable, "-m", "mmfuse.cli", *train_args], {**env, "NODE_RANK": str(n)}) for n in (0, 1)]


def _assert_same_metrics(two: Path, one: Path) -> None:
    steps = [load_checkpoint(d / "checkpoints" / "last.ckpt")["global_step"] for d in (two, one)]
    assert steps[0] == steps[1] > 0, steps  # the same optimiser steps (an untrained model has metrics too)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert a["epochs"] == b["epochs"] and a["records"] == b["records"]
    for split in ("val", "test"):
        assert set(a["metrics"][split]) == set(b["metrics"][split]) == {"color", "is_question", "size", "tags"}
        for task, metrics in b["metrics"][split].items():
            for name, value in metrics.items():
                got = a["metrics"][split][task][name]
                assert math.isclose(got, value, rel_tol=TOL, abs_tol=TOL), (split, task, name, got, value)


@pytest.mark.slow
def test_two_nodes_by_torchrun_give_the_metrics_of_one_process(data: dict[str, Any]) -> None:
    """20 training records: 3 global batches an epoch (8, 8, 4), 4 + 4 records a node in each of the first two."""
    root = data["root"]
    args = ["train", str(data["cfg"]), "--out", str(root / "two"), "--set", "data.batch_size=4"]
    args += ["--set", "train.num_nodes=2"]
    errs = _run_nodes(_torchrun(args, _free_port()), root)
    assert all("features:" in e for e in errs)  # both nodes built (or found) the features before training
    _assert_same_metrics(root / "two", root / "one")


@pytest.mark.slow
def test_two_nodes_from_shards_by_lightning_env_give_the_metrics_of_one_process(data: dict[str, Any]) -> None:
    """data.source=shards, the nodes started with NODE_RANK/MASTER_ADDR/MASTER_PORT: LitData gives each node 10 of
    the 20 training records, one batch of 10 a node, so each step sees all 20 as a 1-process batch of 32 does (the
    record order inside a batch differs: sums in another order, inside the tolerance). A per-node batch above 10
    would run no step at all (under DDP LitData keeps whole batches only): refused, test below."""
    root, cfg = data["root"], str(data["cfg"])
    big = ["--set", "data.batch_size=32", "--set", "train.cache=false"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_CACHE_DIR", str(data["cache"]))
        assert main(["train", cfg, "--out", str(root / "one32"), *big]) == 0
        assert main(["pack", cfg, "--out", str(root / "shards")]) == 0
    args = ["train", cfg, "--out", str(root / "two-shards"), "--set", "data.source=shards"]
    args += ["--set", f"data.path={root / 'shards'}", "--set", "train.cache=false", "--set", "data.batch_size=10"]
    args += ["--set", "train.num_nodes=2"]
    _run_nodes(_lightning_env(args, _free_port()), root)
    _assert_same_metrics(root / "two-shards", root / "one32")


@pytest.mark.slow
def test_a_per_node_batch_beyond_each_nodes_share_of_shards_is_refused(data: dict[str, Any]) -> None:
    """10 of the 20 training records a node, batch 16: no whole batch, so no step; one line, not a 0-step run."""
    root, cfg = data["root"], str(data["cfg"])
    if not (root / "shards").exists():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MMFUSE_CACHE_DIR", str(data["cache"]))
            assert main(["pack", cfg, "--out", str(root / "shards")]) == 0
    args = ["train", cfg, "--out", str(root / "two-big"), "--set", "data.source=shards"]
    args += ["--set", f"data.path={root / 'shards'}", "--set", "train.cache=false", "--set", "data.batch_size=16"]
    args += ["--set", "train.num_nodes=2"]
    with pytest.raises(AssertionError, match="data.batch_size=16 is more than this process's share"):
        _run_nodes(_lightning_env(args, _free_port()), root)


# ---------------------------------------------------------------------------- refusals, without a process group
def _options(num_nodes: int, devices: int = 1) -> TrainOptions:
    return TrainOptions(optim=OptimOptions(), accelerator="cpu", devices=devices, num_nodes=num_nodes)


def _launched(mp: pytest.MonkeyPatch, **env: str) -> None:
    for key in (*LAUNCH_VARS, "MASTER_PORT", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        mp.delenv(key, raising=False)
    for key, value in env.items():
        mp.setenv(key, value)


TORCHRUN = {"TORCHELASTIC_RUN_ID": "t", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}


@pytest.mark.parametrize(
    ("nodes", "devices", "world", "needle"),
    [
        (1, 1, "2", "train.num_nodes=1 x train.devices=1 makes 1 processes, but torchrun's WORLD_SIZE is 2"),
        # under DDP, Lightning's own check (never called for a launcher's processes), prefixed with the train keys
        (2, 1, "4", "num_nodes=2, strategy='auto', precision='32-true'): You set `devices=1` and `num_nodes=2`"),
        (3, 1, "2", "the product (1 * 3) does not match the world size (2)"),
        (2, 2, "2", "the product (2 * 2) does not match the world size (2)"),
    ],
)
def test_a_torchrun_world_other_than_nodes_x_devices_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nodes: int, devices: int, world: str, needle: str
) -> None:
    _launched(monkeypatch, **TORCHRUN, WORLD_SIZE=world)
    with pytest.raises(ConfigError, match="num_nodes") as err:
        build_trainer(_options(nodes, devices), tmp_path, None, "min")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_slurm_task_count_other_than_nodes_x_devices_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`python -m mmfuse.cli train` in an sbatch script without srun: one process where SLURM planned four."""
    slurm = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "job"}
    _launched(monkeypatch, **slurm, SLURM_NODELIST="n1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    with pytest.raises(ConfigError, match="train.num_nodes=1 x train.devices=1 makes 1 processes, but SLURM's"):
        build_trainer(_options(1), tmp_path, None, "min")


def test_a_matching_torchrun_world_builds_a_two_node_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _launched(monkeypatch, **TORCHRUN, WORLD_SIZE="2")
    trainer = build_trainer(_options(2), tmp_path, None, "min")
    assert (trainer.num_nodes, trainer.world_size, type(trainer.strategy).__name__) == (2, 2, "DDPStrategy")


def test_several_nodes_without_a_launcher_are_refused_in_one_line(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without torchrun, srun or NODE_RANK/MASTER_ADDR/MASTER_PORT, node 0 would wait for ever for node 1."""
    _launched(monkeypatch, MASTER_ADDR="127.0.0.1")
    monkeypatch.setenv("MMFUSE_CACHE_DIR", str(data["cache"]))
    code = main(["train", str(data["cfg"]), "--out", str(tmp_path / "run"), "--set", "train.num_nodes=2"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # after the features' lines
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("mmfuse train: error: train.num_nodes=2: NODE_RANK, MASTER_PORT not set"), err[0]
    assert "docs/scale.md" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
