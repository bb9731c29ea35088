"""Tests for `mmfuse init` (src/mmfuse/init_config.py): a table in, a commented run config out that `mmfuse train`
trains as is; bad input is one line and exit 2, and nothing is written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from mmfuse.cli import main
from tiny import write_dataset


def _init(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["init", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_init_then_train_on_a_jsonl_table(tmp_path, monkeypatch, capsys) -> None:
    records = write_dataset(tmp_path / "data", n=12)
    monkeypatch.chdir(tmp_path)
    rc, out, err = _init([str(records), "--tasks", "color,is_question,size,tags"], capsys)
    assert (rc, err) == (0, "")
    assert "  text         text               free text (2 distinct values, up to 4 words) -> hf_text MiniLM" in out
    assert "  color        label: multiclass  3 classes (blue, green, red); 2 rows unlabelled (masked)" in out
    config = tmp_path / "records.yaml"  # <data stem>.yaml in the current folder
    text = config.read_text()
    assert "    # text: free text (2 distinct values, up to 4 words) -> hf_text MiniLM, frozen\n    text: {" in text
    assert "  # size: numbers (-1.26542 to 1.36646, 12 distinct) -> regression\n  size: {kind: regression}" in text
    raw = yaml.safe_load(text)
    assert raw["model"]["encoders"]["image"]["model"] == "tf_efficientnet_lite0"
    assert raw["model"]["fusion"] == {"name": "concat", "output_dim": 256}
    assert raw["tasks"] == {
        "color": {"kind": "multiclass"},
        "is_question": {"kind": "binary"},
        "size": {"kind": "regression"},
        "tags": {"kind": "multilabel"},
    }
    assert raw["data"]["path"] == str(records.resolve())  # absolute: data.path is read from the training folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the config trains from any folder
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--set", "train.max_epochs=1"]) == 0
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["records"]["train"] + summary["records"]["val"] + summary["records"]["test"] == 12
    assert set(summary["metrics"]["test"]) == {"color", "is_question", "size", "tags"}


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _table_rows(n: int = 30) -> list[dict[str, object]]:
    materials = ["wood", "steel", "glass"]
    return [
        {
            "sku": f"item number {i} of the catalogue",
            "weight": "" if i == 4 else f"{1 + (i % 7) * 0.5}",
            "material": materials[i % 3],
            "on_sale": "true" if i % 2 else "false",
            "grade": str(i % 4),  # 0..3: multiclass unless told
            "price": f"{2.5 * (i % 5) + 0.25 * (i % 3)}",
            "split": "test" if i % 10 == 9 else ("val" if i % 10 == 8 else "train"),
        }
        for i in range(n)
    ]


def test_init_types_csv_cells_uses_the_split_column_and_takes_overrides(tmp_path, monkeypatch, capsys) -> None:
    data = _write_csv(tmp_path / "items.csv", _table_rows())
    monkeypatch.chdir(tmp_path)
    out_cfg = tmp_path / "cfg" / "items.yaml"
    argv = [str(data), "--tasks", "grade,price", "--kinds", "grade=regression", "--inputs", "sku=ignore"]
    rc, out, err = _init([*argv, "--out", str(out_cfg)], capsys)
    assert (rc, err) == (0, "")
    raw = yaml.safe_load(out_cfg.read_text())
    assert raw["model"]["encoders"] == {
        "table": {"name": "tabular", "numeric": ["weight"], "categorical": ["material", "on_sale"]}
    }
    assert raw["tasks"] == {"grade": {"kind": "regression"}, "price": {"kind": "regression"}}
    assert "split_field" not in raw["data"] and "val_fraction" not in raw["data"]  # rows marked by `split`
    text = out_cfg.read_text()
    assert "# weight: numbers (1 to 4, 1 missing) -> tabular" in text
    assert "# on_sale: categories (2 values: False, True) -> tabular" in text
    assert "# grade: numbers (0 to 3, 4 distinct) -> regression (as given)" in text
    assert "rows split by the `split` column" in text and "# not used: sku" in text
    run = tmp_path / "run"
    assert main(["train", str(out_cfg), "--out", str(run), "--set", "train.max_epochs=2"]) == 0
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["records"] == {"train": 24, "val": 3, "test": 3}


def test_an_existing_config_is_never_overwritten(tmp_path, capsys) -> None:
    data = _write_csv(tmp_path / "items.csv", _table_rows())
    target = tmp_path / "mine.yaml"
    target.write_text("keep me\n")
    rc, out, err = _init([str(data), "--tasks", "price", "--out", str(target)], capsys)
    assert rc == 2 and err == f"mmfuse init: error: {target}: already exists; pass another --out or remove it\n"
    assert target.read_text() == "keep me\n"


@pytest.mark.parametrize(
    "change, argv, message",
    [
        (None, ["missing.csv", "--tasks", "price"], "missing.csv: records file not found"),
        (None, ["items.csv", "--tasks", "colour"], "task column 'colour' is not in the data (columns: sku, weight,"),
        ({"grade": "1"}, ["items.csv", "--tasks", "grade"], "task column 'grade' holds one class only (1)"),
        ({"photo": "img/0.png"}, ["items.csv", "--tasks", "price"], "column 'photo', row 0: 'img/0.png' names no file"),
        (None, ["items.csv", "--tasks", "price", "--kinds", "price"], "--kinds 'price': expected COLUMN=KIND pairs"),
        (None, ["items.csv", "--tasks", "price", "--kinds", "grade=multiclass"], "--kinds 'grade': not one of --tasks"),
        (None, ["items.csv", "--tasks", "price", "--inputs", "sku=words"], "column 'sku': unknown kind 'words'"),
        (None, ["items.csv", "--tasks", "price", "--root", "nowhere"], "--root nowhere: not a folder"),
        (None, ["items.txt", "--tasks", "price"], "items.txt: unknown records format '.txt'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, change, argv, message) -> None:
    rows = [{**r, **(change or {})} for r in _table_rows()]
    _write_csv(tmp_path / "items.csv", rows)
    (tmp_path / "items.txt").write_text("a,b\n")
    monkeypatch.chdir(tmp_path)
    rc, out, err = _init(argv, capsys)
    assert rc == 2 and message in err, err
    assert err.startswith("mmfuse init: error: ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.csv", "items.txt"]
