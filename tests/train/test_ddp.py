"""The same config on two processes (DDP over gloo on the CPU), unchanged but for devices/strategy.

Runs under `scaleout.run_cli`: a hang fails the test after the timeout and kills every process of the run.
"""

import json
from pathlib import Path

import pytest
import yaml
from scaleout import DDP, run_cli

from tiny import run_config, write_dataset


@pytest.mark.slow
def test_two_cpu_processes_with_ddp(tmp_path: Path) -> None:
    records = write_dataset(tmp_path / "data", n=40)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(run_config(records)))
    proc = run_cli(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), *DDP], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert set(summary["metrics"]["test"]) == {"color", "is_question", "size", "tags"}
    assert proc.stdout.count("run directory:") == 1  # only rank 0 reports
