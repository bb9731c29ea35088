"""The command line imports heavy libraries only when a command needs them (checked in fresh processes).

`--help`, `list` and every argument or config error must answer without importing torch, Lightning or
transformers; `predict` must never import Lightning. Only modules are asserted here, never times (those
are in benchmarks/bench_cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmfuse.cli import _parser
from mmfuse.names import BUILTIN
from tiny import run_config, write_dataset

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ["torch", "lightning", "pytorch_lightning", "transformers", "timm", "torchvision"]

# Runs mmfuse.cli.main(argv) for each argv in a fresh interpreter; after each, prints its exit code, its last
# line of stderr and which heavy modules are imported by then (the first case that imports one is the culprit).
PROBE = """
import contextlib, io, json, sys
from mmfuse.cli import main
heavy = json.loads(sys.argv[2])
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    lines = err.getvalue().strip().splitlines()
    loaded = [m for m in heavy if m in sys.modules]
    results.append({"argv": argv, "rc": rc, "err": lines[-1] if lines else "", "out": out.getvalue(), "loaded": loaded})
print(json.dumps(results))
"""


def _probe(argvs: list[list[str]], cwd: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argvs), json.dumps(HEAVY)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _commands() -> list[str]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_help_of_every_command_imports_nothing_heavy(tmp_path: Path) -> None:
    argvs = [["--help"]] + [[command, "--help"] for command in _commands()]
    for got in _probe(argvs, tmp_path):
        assert (got["argv"], got["rc"], got["loaded"]) == (got["argv"], 0, [])
        assert "usage: mmfuse" in got["out"]


def test_list_shows_every_component_without_importing_them(tmp_path: Path) -> None:
    (got,) = _probe([["list"]], tmp_path)
    assert (got["rc"], got["loaded"]) == (0, [])
    listed = {line.split()[0] for line in got["out"].splitlines() if line.startswith("  ")}
    shown = {name for kind, names in BUILTIN.items() if kind != "head" for name in names}
    assert listed == shown
    assert "  film " in got["out"] and "fc_out(gamma * target + beta)" in got["out"]


@pytest.fixture
def config_files(tmp_path: Path) -> Path:
    """cfg.yaml (valid), bad.yaml (not YAML), seq.yaml (not a mapping) and fake_run/ (looks finished)."""
    cfg = run_config(write_dataset(tmp_path / "data", n=6), max_epochs=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "seq.yaml").write_text("- model\n- tasks\n")
    (tmp_path / "fake_run").mkdir()
    (tmp_path / "fake_run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "fake_run" / "model.safetensors").write_bytes(b"")
    return tmp_path


# (argv, the error line must contain this): every one must fail with exit code 2 before any heavy import.
ERRORS = [
    (["train", "missing.yaml"], "missing.yaml: config file not found"),
    (["train", "bad.yaml"], "bad.yaml: not valid YAML"),
    (["train", "seq.yaml"], "a config must be a mapping"),
    (["train", "cfg.yaml", "--set", "model.fusion.name=nope"], "model.fusion.name: unknown fusion 'nope'"),
    (["train", "--set", "model.fusion.name=nope"], "model.fusion.name: unknown fusion 'nope'"),  # built-in config
    (["train", "cfg.yaml", "--set", "model.encoders.image.name=nope"], "model.encoders.image.name: unknown encoder"),
    (["train", "cfg.yaml", "--set", "tasks.color.kind=nope"], "tasks.color.kind: unknown task kind 'nope'"),
    (["train", "cfg.yaml", "--set", "train.weighting.name=nope"], "train.weighting.name: unknown weighting"),
    (["train", "cfg.yaml", "--set", "train.balance.name=nope"], "train.balance.name: unknown balancer"),
    (["train", "cfg.yaml", "--set", "tasks.color.weight=2", "--set", "train.weighting.name=pcgrad"], "weight"),
    (["train", "cfg.yaml", "--set", "model.colour=1"], "model.colour: unknown key; allowed: encoders, fusion, head"),
    (["train", "cfg.yaml", "--set", "trian.lr=1"], "trian: unknown key"),
    (["train", "cfg.yaml", "--set", "train.max_epochs=zero"], "train.max_epochs:"),
    (["train", "cfg.yaml", "--set", "name=../x"], "name:"),
    (["train", "cfg.yaml", "--set", "train.lr"], "expected KEY=VALUE"),
    (["train", "cfg.yaml", "--set", "train..lr=1"], "empty part"),
    (["train", "cfg.yaml", "--set", "train.lr=[1"], "not valid YAML"),
    (["train", "cfg.yaml", "--set", "train.lr.x=1"], "lr is not a section"),
    (["train", "--resume"], "--resume needs --out"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["nope"], "invalid choice: 'nope'"),
    (["evaluate", "no_run"], "no_run: not a finished run directory (config.yaml is missing)"),
    (["evaluate", "cfg.yaml"], "cfg.yaml: pass the run directory"),
    (["evaluate", "fake_run", "--set", "data.test"], "expected KEY=VALUE"),
    (["evaluate", "fake_run", "--set", "data.tset=x.jsonl"], "data.tset: unknown key"),
    (["predict", "no_run", "--text", "hi"], "no_run: not a finished run directory"),
    (["predict", "fake_run"], "give --input FILE, or the inputs of one record"),
    (["predict", "fake_run", "--field", "text"], "expected NAME=VALUE"),
    (["predict", "fake_run", "--input", "a.jsonl", "--text", "hi"], "give either --input or field values"),
    (["serve", "no_run"], "no_run: not a finished run directory"),
    (["bench", "mtl", "missing.yaml"], "missing.yaml: config file not found"),
    (["bench", "mtl", "cfg.yaml", "--set", "model.fusion.name=nope"], "unknown fusion 'nope'"),
    (["bench", "mtl", "--seeds", "0,x"], "--seeds '0,x': expected comma-separated integers"),
    (["data", "glyphs", "--size", "4"], "mmfuse data glyphs: error: --train/--val/--test must be >= 1, --size in"),
    (["data", "relations", "--out", "x", "--split", "val"], "--split only acts with --score"),
    (["data", "relations", "--out", "x", "--score", "p.jsonl", "--seed", "1"], "--seed: for generating only"),
]


def test_argument_and_config_errors_answer_before_any_heavy_import(config_files: Path) -> None:
    results = _probe([argv for argv, _ in ERRORS], config_files)
    for (argv, message), got in zip(ERRORS, results):
        assert got["rc"] == 2, (argv, got)
        assert message in got["err"], (argv, got["err"])
        assert "Traceback" not in got["err"]
        assert got["loaded"] == [], f"{argv} imported {got['loaded']}"


def test_a_valid_config_does_import_the_components(config_files: Path) -> None:
    """The probe sees imports at all: an option error needs the component's signature (imported lazily)."""
    (got,) = _probe([["train", "cfg.yaml", "--set", "model.fusion.bogus=1"]], config_files)
    assert got["rc"] == 2 and "model.fusion.bogus: unknown option for fusion 'concat'" in got["err"]
    assert "torch" in got["loaded"] and "lightning" not in got["loaded"]


def test_training_off_a_terminal_logs_one_line_per_epoch_and_predict_never_imports_lightning(tmp_path: Path) -> None:
    cfg = run_config(write_dataset(tmp_path / "data", n=24), max_epochs=2, progress_bar=True, log_every_n_steps=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": SRC, "MMFUSE_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "mmfuse.cli", "train", "cfg.yaml", "--out", "run"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # stderr: a pipe
    assert out.returncode == 0, out.stderr[-2000:]
    epochs = [line.split(":")[0] for line in out.stderr.splitlines() if line.startswith("epoch ")]
    assert epochs == ["epoch 1/2", "epoch 2/2"]
    assert "\r" not in out.stderr and "it/s" not in out.stderr  # no bar frames

    argv = ["predict", "run", "--image", "data/images/0.png", "--text", "a square"]
    (got,) = _probe([argv], tmp_path)
    assert got["rc"] == 0, got
    assert "lightning" not in got["loaded"] and "pytorch_lightning" not in got["loaded"]
    assert "torch" in got["loaded"]  # the probe sees imports at all
