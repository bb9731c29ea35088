"""`mmfuse.multirun`, the steps `bench` and `compare` share: reuse-or-train, the scoring split, mean and std."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmfuse.config import ConfigError, RunConfig, parse_config
from mmfuse.multirun import fmt_stats, primary_metrics, scoring_split, seed_stats, train_or_reuse
from tiny import run_config, write_dataset

SUMMARY = {"metrics": {"test": {"color": {"accuracy": 0.5}}}, "timings_s": {"total": 1.0}}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    return parse_config(run_config(write_dataset(tmp_path_factory.mktemp("multirun"), n=8)))


@pytest.fixture
def trains(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Calls of `mmfuse.train.run.train` (which returns `SUMMARY` instead of training)."""
    from mmfuse.train import run as train_run

    calls: list[tuple[str, bool]] = []

    def fake(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
        calls.append((Path(run_dir).name, resume))
        return SUMMARY

    monkeypatch.setattr(train_run, "train", fake)
    return calls


def _saved(run_dir: Path, cfg: RunConfig, metrics: str | None = None, last: bool = False) -> Path:
    """A run folder holding `cfg` as its config.yaml, optionally metrics.json and checkpoints/last.ckpt."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    if metrics is not None:
        (run_dir / "metrics.json").write_text(metrics)
    if last:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    return run_dir


def test_trains_a_new_folder_resumes_an_interrupted_one_and_reads_back_a_finished_one(
    cfg: RunConfig, tmp_path: Path, trains: list[tuple[str, bool]]
) -> None:
    assert train_or_reuse(cfg, tmp_path / "new") == (SUMMARY, "trained")
    assert train_or_reuse(cfg, _saved(tmp_path / "cut", cfg, last=True)) == (SUMMARY, "resumed")
    done = {"metrics": {"val": {"color": {"accuracy": 0.25}}}}
    assert train_or_reuse(cfg, _saved(tmp_path / "done", cfg, metrics=json.dumps(done))) == (done, "reused")
    assert trains == [("new", False), ("cut", True)]


def test_another_config_and_a_broken_metrics_file_are_one_line_errors(
    cfg: RunConfig, tmp_path: Path, trains: list[tuple[str, bool]]
) -> None:
    other = cfg.model_copy(update={"seed": cfg.seed + 1})
    with pytest.raises(ConfigError, match="holds a run of another config; use another --out or delete that folder"):
        train_or_reuse(other, _saved(tmp_path / "a", cfg))
    broken = _saved(tmp_path / "b", cfg, metrics="{not json")
    with pytest.raises(ConfigError, match="metrics.json: not valid JSON; delete it to evaluate the run again"):
        train_or_reuse(cfg, broken)
    assert trains == []


def test_scoring_split_is_test_else_val_and_neither_is_an_error(tmp_path: Path) -> None:
    assert scoring_split({"metrics": {"val": {}, "test": {}}}, tmp_path) == "test"
    assert scoring_split({"metrics": {"val": {}}}, tmp_path) == "val"
    with pytest.raises(ConfigError, match=f"{tmp_path}: no validation or test records to score it"):
        scoring_split({"metrics": {}}, tmp_path)


def test_primary_metrics_name_each_tasks_metric_and_direction(cfg: RunConfig) -> None:
    data = cfg.model_dump(mode="json")  # resolved, as a finished run's config.yaml: classes written in
    data["tasks"]["color"]["classes"], data["tasks"]["tags"]["classes"] = ["red", "green"], ["a", "b"]
    assert primary_metrics(parse_config(data)) == {
        "color": {"metric": "accuracy", "higher_is_better": True},
        "is_question": {"metric": "auroc", "higher_is_better": True},
        "size": {"metric": "mae", "higher_is_better": False},
        "tags": {"metric": "macro_f1", "higher_is_better": True},
    }


def test_seed_stats_are_mean_and_sample_std_and_format_as_mean_plus_minus_std() -> None:
    s = seed_stats([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3) and s["std"] == pytest.approx(math.sqrt(7 / 3))
    assert s["per_seed"] == [1.0, 2.0, 4.0]
    assert fmt_stats(s, 2) == "2.33 ± 1.53" and fmt_stats(s, 1, signed=True) == "+2.3 ± 1.5"
    assert seed_stats([0.5])["std"] is None and fmt_stats(seed_stats([0.5])) == "0.5000"
    assert fmt_stats(seed_stats([float("nan")])) == "n/a"
