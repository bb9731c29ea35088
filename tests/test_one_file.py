"""Adding a piece is one file (issue 21): a fusion, an encoder (with its test recipe), a task kind, a weighting and a
balancer, each written as one new file into a plugin folder named by `MMFUSE_PLUGINS`, are listed by `mmfuse list`,
accepted by the config and built and trained by `mmfuse train`, and picked up by the registry-wide contract tests
with no other edit (they run, parametrized by the new names, in a fresh pytest)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmfuse.cli import main
from mmfuse.registry import PLUGINS_ENV

ROOT = Path(__file__).resolve().parents[1]

FILES = {
    "fusion/mean_fusion.py": '''
"""Mean fusion: project every modality to the output size and average."""

from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput


@FUSIONS.register("zzplug_mean")
class MeanFusion(Fusion):
    """Project each modality to the output size and average: `mean_m (W_m x_m + b_m)`."""

    def __init__(self, input_dims: dict[str, int], output_dim: int) -> None:
        super().__init__(input_dims, output_dim)
        self.fc = nn.ModuleDict({m: nn.Linear(d, output_dim) for m, d in self.input_dims.items()})

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        parts = {m: self.fc[m](features[m].pooled) / len(self.modalities) for m in self.modalities}  # each (B, D)
        return FusionOutput(fused=sum(parts.values()), contributions=parts)
''',
    "encoders/vector.py": '''
"""Short vectors of numbers as a modality (the embedding encoder under its own name), with its test recipe."""

from mmfuse.encoders.base import ENCODERS
from mmfuse.encoders.embedding import EmbeddingEncoder


@ENCODERS.register("zzplug_vector")
class VectorEncoder(EmbeddingEncoder):
    """A short vector of numbers per record, projected by a Linear layer."""


def row(i: int, root, modality: str) -> dict:
    """Sample i (class i % 3): a one-hot of its class plus a sample-specific value."""
    return {modality: [float(i % 3 == k) for k in range(3)] + [0.01 * i]}


TEST_RECIPE = {"options": {"dim": 4, "project": 5}, "row": row}
''',
    "tasks/percent.py": '''
"""Percent task: a share written as a number or a percentage."""

from mmfuse.tasks.base import TASK_KINDS
from mmfuse.tasks.regression import RegressionTask


@TASK_KINDS.register("zzplug_percent")
class PercentTask(RegressionTask):
    """A share written as a number (0.4) or a percentage ("40%"); regressed as a number, MSE or L1 loss."""

    kind = "zzplug_percent"
    example_labels = ("40%", "5%", 0.25)

    def encode(self, raw):
        text = raw.strip() if isinstance(raw, str) else None
        if text is not None and text.endswith("%"):
            return super().encode(text[:-1]) / 100
        return super().encode(raw)
''',
    "mtl/log_sum.py": '''
"""Log-sum weighting: large losses count less."""

import torch

from mmfuse.mtl.base import WEIGHTINGS, Weighting


@WEIGHTINGS.register("zzplug_log_sum")
class LogSumWeighting(Weighting):
    """Backward `sum_t log(1 + L_t)`, so the task weights are `1 / (1 + L_t)`."""

    def weigh(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.log1p(losses).sum(), (1 / (1 + losses)).detach()
''',
    "balance/constant.py": '''
"""Constant balancing: every modality's learning rate scaled by one factor."""

from mmfuse.balance.base import BALANCERS, Balancer, require_modality_parameters


@BALANCERS.register("zzplug_constant")
class ConstantScale(Balancer):
    """Scale the learning rate of every modality's own parameters by `k` on every step."""

    def __init__(self, modalities: list[str], k: float = 0.5) -> None:
        super().__init__(modalities)
        if not 0 <= k < float("inf"):
            raise ValueError(f"zzplug_constant: k must be >= 0, got {k}")
        self.k = k

    def setup(self, model) -> None:
        require_modality_parameters("zzplug_constant", model)
        super().setup(model)

    def modulate(self, model, out, labels, masks, epoch: int) -> dict[str, float]:
        self.lr_scale = {m: self.k for m in self.modalities}
        return {"k": self.k}
''',
}
NAMES = {
    "encoders": "zzplug_vector",
    "fusions": "zzplug_mean",
    "task kinds": "zzplug_percent",
    "weightings": "zzplug_log_sum",
    "balancers": "zzplug_constant",
}
CONTRACTS = [
    "tests/fusion/test_fusion_contract.py",
    "tests/encoders/test_encoder_contract.py",
    "tests/test_tasks.py",
    "tests/mtl/test_registry.py",
    "tests/balance/test_balancer_contract.py",
]


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    """A plugin folder holding one new file per kind."""
    folder = tmp_path / "plugins"
    for rel, text in FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text.lstrip())
    return folder


def _env(plugins: Path) -> dict[str, str]:
    return {**os.environ, PLUGINS_ENV: str(plugins), "PYTHONPATH": str(ROOT / "src")}


def _config(root: Path) -> Path:
    """Two vector modalities and a percent task over 24 records, every component a plugin."""
    rows = [{"a": [float(i % 3), 0.1 * i], "b": [1.0, -0.1 * i], "share": f"{(i % 3) * 40}%"} for i in range(24)]
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    vector = {"name": "zzplug_vector", "dim": 2, "project": 4}
    cfg = {
        "name": "plugins",
        "model": {"encoders": {"a": vector, "b": vector}, "fusion": {"name": "zzplug_mean", "output_dim": 4}},
        "tasks": {"share": {"kind": "zzplug_percent"}},
        "data": {"source": "records", "path": "records.jsonl", "val_fraction": 0.25, "test_fraction": 0.25},
        "train": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "progress_bar": False,
            "weighting": {"name": "zzplug_log_sum"},
            "balance": {"name": "zzplug_constant", "k": 0.5},
        },
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root / "cfg.yaml"


def test_mmfuse_list_shows_each_new_file_and_only_with_the_plugin_folder(
    plugins: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert main(["list"]) == 0
    assert "zzplug" not in capsys.readouterr().out
    monkeypatch.setenv(PLUGINS_ENV, str(plugins))
    assert main(["list"]) == 0
    sections = re.split(r"^(\S[^\n]*):\n", capsys.readouterr().out, flags=re.M)[1:]
    listed = {title.split(" (")[0]: body for title, body in zip(sections[::2], sections[1::2])}
    for section, name in NAMES.items():
        assert re.search(rf"^  {name} +\S", listed[section], flags=re.M), (section, listed[section])
    assert "Project each modality to the output size and average" in listed["fusions"]


def test_the_config_refuses_them_without_the_plugin_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _config(tmp_path)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "unknown encoder 'zzplug_vector'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_mmfuse_train_builds_and_trains_every_new_piece_from_a_config(plugins: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cmd = [sys.executable, "-m", "mmfuse.cli", "train", str(cfg), "--out", "run"]
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(plugins), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["model"]["fusion"]["name"] == "zzplug_mean"
    assert resolved["train"]["balance"]["name"] == "zzplug_constant"
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["test"]
    assert "share" in json.dumps(test), test


def test_the_registry_wide_contract_tests_pick_up_every_new_file(plugins: Path) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", "zzplug", *CONTRACTS]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(plugins), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    passed = [line for line in out.stdout.splitlines() if line.startswith("PASSED ")]
    for name in NAMES.values():
        assert sum(f"[{name}" in line or f"-{name}]" in line for line in passed) >= 1, (name, out.stdout[-3000:])
    counts = {path: sum(line.startswith(f"PASSED {path}::") for line in passed) for path in CONTRACTS}
    assert all(n >= 1 for n in counts.values()), counts
