"""Δm by hand, and `run_mtl_bench` end to end on a few dozen records with tiny random-weight encoders."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from mmfuse.bench import delta_m, resolve_weightings, run_mtl_bench
from mmfuse.cli import main
from mmfuse.config import ConfigError
from mmfuse.mtl import WEIGHTINGS
from tiny import tiny_model, write_dataset


# ---------------------------------------------------------------- Δm by hand
def test_delta_m_is_zero_when_multi_task_equals_single_task() -> None:
    st = {"a": 0.8, "b": 2.0}
    assert delta_m(dict(st), st, {"a": True, "b": False}) == 0.0


def test_delta_m_one_task_better_one_lower_is_better_task_worse() -> None:
    # a: accuracy 0.5 -> 0.55 is +10 %; b: MAE 2.0 -> 2.1 is 5 % worse, counted -5 %. (10 - 5) / 2 = 2.5
    got = delta_m({"a": 0.55, "b": 2.1}, {"a": 0.5, "b": 2.0}, {"a": True, "b": False})
    assert got == pytest.approx(2.5)


def test_delta_m_lower_is_better_improvement_is_positive() -> None:
    # MAE 4 -> 3 is 25 % better: +25
    assert delta_m({"mae": 3.0}, {"mae": 4.0}, {"mae": False}) == pytest.approx(25.0)
    # the same relative change with higher-is-better reads the other way
    assert delta_m({"acc": 3.0}, {"acc": 4.0}, {"acc": True}) == pytest.approx(-25.0)


def test_delta_m_averages_over_tasks() -> None:
    # +20 %, -10 %, lower-is-better 1.0 -> 0.7 (+30 %): (20 - 10 + 30) / 3
    got = delta_m({"a": 0.6, "b": 0.45, "c": 0.7}, {"a": 0.5, "b": 0.5, "c": 1.0}, {"a": True, "b": True, "c": False})
    assert got == pytest.approx(40.0 / 3)


def test_delta_m_divides_by_the_magnitude_of_a_negative_baseline() -> None:
    # higher is better, -2 -> -1 is an improvement of |1 / -2| = 50 %
    assert delta_m({"r2": -1.0}, {"r2": -2.0}, {"r2": True}) == pytest.approx(50.0)


def test_delta_m_rejects_a_zero_baseline_and_mismatched_tasks() -> None:
    with pytest.raises(ValueError, match="is 0"):
        delta_m({"a": 0.1}, {"a": 0.0}, {"a": True})
    with pytest.raises(ValueError, match="tasks differ"):
        delta_m({"a": 0.1}, {"a": 0.2, "b": 1.0}, {"a": True, "b": True})


def test_resolve_weightings_expands_all_and_rejects_unknown_names() -> None:
    assert resolve_weightings(["all"]) == WEIGHTINGS.names()
    assert resolve_weightings(["pcgrad", " equal", "pcgrad", ""]) == ["pcgrad", "equal"]
    with pytest.raises(ConfigError, match="unknown weighting 'nope'"):
        resolve_weightings(["equal", "nope"])
    with pytest.raises(ConfigError, match="at least one"):
        resolve_weightings([""])


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-data")
    cfg = {
        "name": "tiny_bench",
        "seed": 0,
        "model": tiny_model(),
        "tasks": {"color": {"kind": "multiclass"}, "size": {"kind": "regression"}},
        "data": {
            "source": "records",
            "path": str(write_dataset(root, n=40)),
            "val_fraction": 0.25,
            "test_fraction": 0.25,
            "batch_size": 8,
            "num_workers": 0,
        },
        "train": {"max_epochs": 2, "lr": 0.01, "accelerator": "cpu", "progress_bar": False},
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def bench(config: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    return out, run_mtl_bench(config, [], ["equal", "uncertainty"], [0], out)


def test_bench_writes_a_row_per_weighting_and_the_definition(bench: tuple[Path, str]) -> None:
    out, text = bench
    assert (out / "delta_m.md").read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | color accuracy ↑ | size mae ↓ | Δm (%) ↑ |")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| single-task (one model per task)", "| equal", "| uncertainty"]
    assert "Δm = (100 / T)" in text and "`tiny_bench`" in text and "2 epochs" in text
    for run in ("single-color", "single-size", "equal", "uncertainty"):
        assert (out / run / "seed0" / "metrics.json").exists(), run


def test_bench_single_task_runs_hold_one_task_and_monitor_it(bench: tuple[Path, str]) -> None:
    out, _ = bench
    cfg = yaml.safe_load((out / "single-size" / "seed0" / "config.yaml").read_text())
    assert list(cfg["tasks"]) == ["size"] and cfg["train"]["monitor"] == "val/size/mae"
    assert cfg["train"]["max_epochs"] == 2 and cfg["seed"] == 0 and cfg["train"]["progress_bar"] is False
    multi = yaml.safe_load((out / "uncertainty" / "seed0" / "config.yaml").read_text())
    assert multi["train"]["weighting"] == {"name": "uncertainty"} and list(multi["tasks"]) == ["color", "size"]


def test_bench_delta_m_is_finite_and_matches_the_json_metrics(bench: tuple[Path, str]) -> None:
    out, text = bench
    result = json.loads((out / "delta_m.json").read_text())
    assert result["split"] == "test"
    assert result["tasks"] == {
        "color": {"metric": "accuracy", "higher_is_better": True},
        "size": {"metric": "mae", "higher_is_better": False},
    }
    models = result["models"]
    st = {t: m["mean"] for t, m in models["single-task"]["metrics"].items()}
    hib = {t: d["higher_is_better"] for t, d in result["tasks"].items()}
    for w in ("equal", "uncertainty"):
        dm = models[w]["delta_m"]["mean"]
        assert math.isfinite(dm)
        assert dm == pytest.approx(delta_m({t: m["mean"] for t, m in models[w]["metrics"].items()}, st, hib))
        assert f"| {w} |" in text and f"{dm:+.2f}" in text
        saved = json.loads((out / w / "seed0" / "metrics.json").read_text())["metrics"]["test"]
        assert models[w]["metrics"]["size"]["mean"] == saved["size"]["mae"]


def test_bench_rerun_reuses_finished_runs_and_refuses_another_config(bench: tuple[Path, str], config: Path) -> None:
    out, text = bench
    before = (out / "equal" / "seed0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    again = run_mtl_bench(config, [], ["equal", "uncertainty"], [0], out)
    assert (out / "equal" / "seed0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns == before
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line for line in again.splitlines() if line.startswith("| ")] == table
    with pytest.raises(ConfigError, match="another config"):
        run_mtl_bench(config, ["train.lr=0.5"], ["equal"], [0], out)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ("{not json", "metrics.json: not valid JSON; delete it to evaluate the run again"),
        ('{"metrics": {}, "timings_s": {"total": 1.0}}', "no validation or test records to score it"),
    ],
)
def test_cli_a_finished_run_that_cannot_be_read_back_is_one_line_naming_it(
    bench: tuple[Path, str],
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    metrics: str,
    message: str,
) -> None:
    run = tmp_path / "out" / "single-color" / "seed0"  # the bench's first run, finished with an unusable metrics.json
    run.mkdir(parents=True)
    shutil.copy(bench[0] / "single-color" / "seed0" / "config.yaml", run)
    (run / "metrics.json").write_text(metrics)
    argv = ["bench", "mtl", str(config), "--weightings", "equal", "--seeds", "0", "--out", str(tmp_path / "out")]
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # the bench's progress lines are logged too
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("mmfuse bench: error: "), err
    assert str(run) in errors[0] and message in errors[0] and "Traceback" not in err, err
    assert not (run / "checkpoints").exists()  # nothing was trained
