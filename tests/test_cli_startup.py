"""The command line imports heavy libraries only when a command needs them (checked in fresh processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mmfuse.config import parse_config
from tiny import run_config, write_dataset

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Runs mmfuse.cli.main(argv) in a fresh interpreter and prints its exit code and which heavy modules got imported.
PROBE = """
import json, sys
from mmfuse.cli import main
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as e:
    rc = e.code
heavy = ["torch", "lightning", "transformers", "timm", "torchvision"]
print(json.dumps({"rc": rc, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def _probe(argv: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_nothing_heavy(tmp_path: Path) -> None:
    got = _probe(["--help"], tmp_path)
    assert got == {"rc": 0, "loaded": []}
    got = _probe(["train", "--help"], tmp_path)
    assert got == {"rc": 0, "loaded": []}


def test_a_missing_config_is_an_error_before_any_heavy_import(tmp_path: Path) -> None:
    got = _probe(["train", str(tmp_path / "nope.yaml")], tmp_path)
    assert got["rc"] == 2
    assert "lightning" not in got["loaded"] and "transformers" not in got["loaded"]


def test_predict_never_imports_lightning(tmp_path: Path) -> None:
    from mmfuse.train.run import train

    cfg = parse_config(run_config(write_dataset(tmp_path / "data", n=24), max_epochs=1))
    train(cfg, tmp_path / "run")
    argv = ["predict", str(tmp_path / "run"), "--image", str(tmp_path / "data/images/0.png"), "--text", "a square"]
    got = _probe(argv, tmp_path)
    assert got["rc"] == 0
    assert "lightning" not in got["loaded"]
    assert "torch" in got["loaded"]  # the probe sees imports at all
