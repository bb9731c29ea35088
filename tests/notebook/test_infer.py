"""Tests for `mmfuse.infer`: each column's use, each label's task kind, and the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfuse.infer import PlanError, plan_inputs


@pytest.fixture
def frame(tmp_path: Path) -> pd.DataFrame:
    (tmp_path / "img").mkdir()
    for i in range(6):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"png")  # existence is what the plan checks
    return pd.DataFrame(
        {
            "photo": [f"img/{i}.png" for i in range(6)],
            "review": [f"a long free text number {i} about the item" for i in range(6)],
            "material": ["wood", "steel", "wood", "glass", "steel", None],
            "weight": [1.5, 2.0, np.nan, 3.25, 1.0, 2.5],
            "on_sale": [True, False, True, False, True, False],
            "clip": [np.arange(4, dtype=np.float32) + i for i in range(6)],
            "color": ["red", "blue", "red", "green", "blue", "red"],
            "price": [9.99, 12.5, 3.0, 7.25, 8.0, 1.5],
            "spam": [0, 1, 0, 1, 1, 0],
            "tags": ["a|b", "b", "a", "a|c", "c", "b|c"],
        }
    )


def test_every_column_gets_its_use_and_every_label_its_kind(frame, tmp_path) -> None:
    plan = plan_inputs(frame, ["color", "price", "spam", "tags"], root=tmp_path)
    assert plan.columns == {
        "photo": "image",
        "review": "text",
        "material": "categorical",
        "weight": "numeric",
        "on_sale": "categorical",
        "clip": "embedding",
    }
    assert plan.tasks == {"color": "multiclass", "price": "regression", "spam": "binary", "tags": "multilabel"}
    assert plan.dims == {"clip": 4}
    encoders = plan.encoders()
    assert encoders["photo"]["name"] == "timm" and encoders["photo"]["field"] == "photo"
    assert encoders["review"]["name"] == "hf_text" and encoders["clip"] == {
        "name": "embedding",
        "dim": 4,
        "field": "clip",
    }
    assert encoders["table"] == {"name": "tabular", "numeric": ["weight"], "categorical": ["material", "on_sale"]}
    shown = str(plan)
    assert "clip      embedding (4 numbers)" in shown and "price     label: regression" in shown


def test_overrides_and_given_kinds_win(frame, tmp_path) -> None:
    plan = plan_inputs(
        frame, {"color": None, "spam": "multiclass"}, inputs={"material": "text", "clip": "ignore"}, root=tmp_path
    )
    assert plan.columns["material"] == "text" and "clip" not in plan.columns
    assert plan.tasks == {"color": "multiclass", "spam": "multiclass"}


@pytest.mark.parametrize(
    "change, tasks, message",
    [
        ({}, ["colour"], "task column 'colour' is not in the data (columns: photo, review,"),
        ({"color": ["red"] * 6}, ["color"], "task column 'color' holds one class only ('red'): nothing to learn"),
        (
            {"photo": ["img/0.png"] * 5 + ["img/missing.png"]},
            ["color"],
            "column 'photo', row 5: 'img/missing.png' names no file",
        ),
        ({"clip": [[1.0, 2.0]] * 5 + [[1.0]]}, ["color"], "column 'clip' holds vectors of several lengths [1, 2]"),
        ({"weight": [1, "a", 2, 3, 4, 5]}, ["color"], "column 'weight' mixes value types (int, str): give it one type"),
        (
            {"review": [None] * 6},
            ["color"],
            "column 'review' holds no value: drop it or pass inputs={'review': 'ignore'}",
        ),
        ({}, {"color": "ordinal"}, "task 'color': unknown kind 'ordinal'; choose one of binary, multiclass"),
    ],
)
def test_bad_columns_are_one_line_naming_the_column(frame, tmp_path, change, tasks, message) -> None:
    for column, values in change.items():
        frame[column] = values
    with pytest.raises(PlanError) as err:
        plan_inputs(frame, tasks, root=tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_unknown_input_kind_and_a_plan_without_inputs_are_refused(frame, tmp_path) -> None:
    with pytest.raises(PlanError, match="inputs: column 'weight': unknown kind 'float'; choose one of image, text"):
        plan_inputs(frame, ["color"], inputs={"weight": "float"}, root=tmp_path)
    with pytest.raises(PlanError, match="no input column left: every column is a task or ignored"):
        plan_inputs(frame[["color", "spam"]], ["color"], inputs={"spam": "ignore"}, root=tmp_path)
