"""Tests for `mmfuse.MultiTaskPredictor`: a DataFrame in, one fitted multi-task run out, used like a notebook would.

One predictor is fitted per module (the packaged EfficientNet-Lite0 and MiniLM, frozen, 3 epochs on 40 rows):
`fit -> predict / predict_proba / evaluate / extract_embedding -> save -> load`, and the CLI on the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfuse import MultiTaskPredictor
from mmfuse.cli import main
from mmfuse.infer import PlanError
from tiny import write_dataset


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """40 rows: an image, a text and a 3-number embedding; labels color (3 classes), is_question (0/1), price."""
    root = tmp_path_factory.mktemp("table")
    frame = pd.read_json(write_dataset(root / "data", n=40), lines=True).drop(columns=["tags", "size"])
    frame["image"] = "data/" + frame["image"]
    frame["price"] = [float(i % 5) + 0.5 * (i % 3) for i in range(len(frame))]
    frame["vec"] = [np.array([0.1 * i, 1.0, -0.5], dtype=np.float32) for i in range(len(frame))]
    return frame, root


@pytest.fixture(scope="module")
def fitted(table, tmp_path_factory: pytest.TempPathFactory) -> MultiTaskPredictor:
    frame, root = table
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        predictor = MultiTaskPredictor(["color", "is_question", "price"], path=root / "run", verbose=False)
        return predictor.fit(frame.iloc[:32], presets="fast", data_root=root, time_limit=3600)


def test_fit_writes_an_ordinary_run_and_says_what_it_learnt(fitted, table) -> None:
    assert (fitted.path / "model.safetensors").is_file() and (fitted.path / "checkpoints" / "best.ckpt").is_file()
    assert fitted.plan is not None and fitted.plan.columns == {"image": "image", "text": "text", "vec": "embedding"}
    summary = json.loads((fitted.path / "metrics.json").read_text())
    assert summary["records"] == {"train": 29, "val": 3, "test": 0}  # 10% of 32 held out by the seed
    assert summary["stop_reason"] == "max_epochs"
    assert "time_limit: 3600" in (fitted.path / "config.yaml").read_text()  # passed on to the trainer
    shown = repr(fitted)
    assert shown.startswith(
        f"MultiTaskPredictor(path={str(fitted.path)!r}, tasks={{color: multiclass, is_question: binary, "
        "price: regression})\n  trained on 29 rows, tuned on 3\n  val metrics: color accuracy"
    )


def test_predict_gives_one_column_per_task_in_the_rows_order(fitted, table) -> None:
    frame, root = table
    rows = frame.iloc[32:]
    out = fitted.predict(rows, data_root=root)
    assert list(out.columns) == ["color", "is_question", "price"] and list(out.index) == list(rows.index)
    assert set(out["color"]) <= {"red", "green", "blue"} and set(out["is_question"]) <= {0, 1}
    assert out["price"].dtype == np.float64
    proba = fitted.predict_proba(rows, data_root=root)
    assert set(proba) == {"color", "is_question"} and sorted(proba["color"].columns) == ["blue", "green", "red"]
    np.testing.assert_allclose(proba["color"].sum(axis=1), 1.0, atol=1e-5)
    assert (proba["color"].idxmax(axis=1) == out["color"]).all()


def test_evaluate_equals_the_cli_on_the_same_rows(fitted, table, capsys) -> None:
    frame, root = table
    val = pd.read_json(fitted.path / "data" / "val.jsonl", lines=True)
    ours = fitted.evaluate(val, data_root=root)
    capsys.readouterr()
    assert main(["evaluate", str(fitted.path), "--split", "val", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    for task, metrics in ours.items():
        for name, value in metrics.items():
            assert value == pytest.approx(cli[task][name], abs=1e-6), (task, name)


def test_extract_embedding_is_the_fused_vector_and_each_modality(fitted, table) -> None:
    frame, root = table
    fused = fitted.extract_embedding(frame.iloc[32:], data_root=root)
    assert fused.shape == (8, 256) and np.isfinite(fused).all()
    parts = fitted.extract_embedding(frame.iloc[32:], per_modality=True, data_root=root)
    assert {k: v.shape for k, v in parts.items()} == {"image": (8, 1280), "text": (8, 384), "vec": (8, 3)}
    np.testing.assert_allclose(parts["vec"], np.stack(frame["vec"].iloc[32:]), atol=1e-6)  # passed through as given


def test_save_and_load_give_the_same_answers_and_the_cli_reads_the_folder(fitted, table, tmp_path, capsys) -> None:
    frame, root = table
    saved = fitted.save(tmp_path / "saved")
    loaded = MultiTaskPredictor.load(saved)
    assert repr(loaded).splitlines()[1:] == repr(fitted).splitlines()[1:]
    pd.testing.assert_frame_equal(
        loaded.predict(frame.iloc[32:], data_root=root), fitted.predict(frame.iloc[32:], data_root=root)
    )
    rows = tmp_path / "rows.jsonl"
    frame.iloc[32:].assign(image=[str(root / p) for p in frame["image"].iloc[32:]]).to_json(
        rows, orient="records", lines=True
    )
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", str(saved), "--input", str(rows), "--output", str(preds), "--allow-outside-root"]) == 0
    cli = [json.loads(line)["color"]["label"] for line in preds.read_text().splitlines()]
    assert cli == list(fitted.predict(frame.iloc[32:], data_root=root)["color"])


def test_bad_input_is_one_line_naming_the_column(fitted, table, tmp_path) -> None:
    frame, root = table
    wrong = frame.iloc[32:].copy()
    wrong["text"] = 7
    with pytest.raises(Exception) as err:
        fitted.predict(wrong, data_root=root)
    assert "text" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PlanError, match="evaluate: task column 'price' is not in the data"):
        fitted.evaluate(frame.drop(columns=["price"]), data_root=root)
    with pytest.raises(PlanError, match="already holds a run; give the predictor another path"):
        MultiTaskPredictor(["color"], path=fitted.path, verbose=False).fit(frame, data_root=root)
    with pytest.raises(PlanError, match="presets: unknown 'best'; choose one of medium_quality, fast, high_quality"):
        MultiTaskPredictor(["color"], path=tmp_path / "p", verbose=False).fit(frame, presets="best", data_root=root)
    with pytest.raises(PlanError, match="time_limit must be > 0 seconds, got 0"):
        MultiTaskPredictor(["color"], path=tmp_path / "p", verbose=False).fit(frame, time_limit=0, data_root=root)
    with pytest.raises(PlanError, match="not a finished run directory"):
        MultiTaskPredictor.load(tmp_path)


def test_hold_out_keeps_the_questions_of_one_image_together() -> None:
    from mmfuse.infer import InputPlan
    from mmfuse.predictor import hold_out

    rows = [{"image": f"{i // 4}.png", "text": f"q{i}", "answer": i % 3} for i in range(80)]  # 20 images x 4
    plan = InputPlan(columns={"image": "image", "text": "text"}, tasks={"answer": "multiclass"}, root=Path("."))
    train, val = hold_out(rows, plan, seed=0)
    assert len(val) == 8 and len(train) == 72  # 2 of the 20 images, all 4 questions each
    assert not {r["image"] for r in train} & {r["image"] for r in val}
    assert hold_out(rows, plan, seed=0) == (train, val) and hold_out(rows, plan, seed=1) != (train, val)
    assert hold_out(rows[:9], plan, seed=0) == (rows[:9], [])  # too few rows to hold any out


def test_classes_come_from_every_row_as_training_would_learn_them() -> None:
    from mmfuse.predictor import task_fit

    assert task_fit("multiclass", ["red", None, "blue", "red", "black"]) == {"classes": ["black", "blue", "red"]}
    assert task_fit("regression", [1.5, 2.0]) == {}
