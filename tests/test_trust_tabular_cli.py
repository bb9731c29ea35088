"""Issue 19 through the CLI, on a tiny table + embedding run: a misspelt column, a value far outside the training
range, non-finite outputs, and a binary task answered with the data's own labels (yes/no, not 0/1)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mmfuse.cli import main
from mmfuse.tasks import TASK_KINDS, build_task


def write_table(root: Path, n: int = 32) -> Path:
    rows = [
        {
            "weight_kg": 1 + (i % 4) * 2.5,
            "material": ["wood", "steel"][i % 2],
            "vec": [i % 3 * 0.1, 0.2, 0.3],
            "spam": "yes" if i % 2 else "no",
            "kind": ["a", "b", "c"][i % 3],
        }
        for i in range(n)
    ]
    path = root / "table.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)) + "\n")
    return path


def table_config(records: Path, **changes: Any) -> dict[str, Any]:
    cfg = {
        "name": "table",
        "seed": 0,
        "model": {
            "encoders": {
                "table": {
                    "name": "tabular",
                    "numeric": ["weight_kg"],
                    "categorical": ["material"],
                    "dim": 8,
                    "heads": 2,
                },
                "vec": {"name": "embedding", "dim": 3},
            },
            "fusion": {"name": "concat", "output_dim": 8},
        },
        "tasks": {"spam": {"kind": "binary"}, "kind": {"kind": "multiclass"}},
        "data": {"source": "records", "path": str(records), "val_fraction": 0.25, "batch_size": 8, "num_workers": 0},
        "train": {"max_epochs": 1, "accelerator": "cpu", "progress_bar": False},
    }
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("table-run")
    (root / "cfg.yaml").write_text(yaml.safe_dump(table_config(write_table(root))))
    assert main(["train", str(root / "cfg.yaml"), "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.mark.parametrize(
    ("key", "columns", "message"),
    [
        ("categorical", ["materail"], "categorical column 'materail' has no value in any of the"),
        ("numeric", ["weight_gk"], "numeric column 'weight_gk' has no value in any of the"),
    ],
)
def test_a_misspelt_table_column_stops_training_with_one_line(tmp_path, capsys, key, columns, message) -> None:
    cfg = table_config(write_table(tmp_path), **{f"model.encoders.table.{key}": columns})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = cli(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")], capsys)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and err.startswith("mmfuse train: error: model.encoders.table: "), err
    assert message in err and "check its name against the records' fields" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_value_far_outside_the_training_range_is_refused_with_its_row(table_run, tmp_path, capsys) -> None:
    records = tmp_path / "in.jsonl"
    rows = [
        {"weight_kg": 3.0, "material": "wood", "vec": [0, 0, 0]},
        {"weight_kg": 1e30, "material": "wood", "vec": [0, 0, 0]},
    ]
    records.write_text("\n".join(map(json.dumps, rows)) + "\n")
    code, out, err = cli(["predict", str(table_run), "--input", str(records)], capsys)
    assert code == 2 and "nan" not in out.lower(), (out, err)
    assert err.strip().count("\n") == 0, err
    assert err.startswith(f"mmfuse predict: error: {records}:2: table: column 'weight_kg': 1e+30 is "), err
    assert "standard deviations from the training mean" in err
    assert "the model answers within 1000" in err
    code, out, err = cli(["predict", str(table_run), "--input", str(records), "--skip-bad"], capsys)
    assert code == 0 and "nan" not in out.lower() and f"skipped {records}:2" in err, (out, err)


def test_a_far_value_in_training_data_is_clamped_never_nan(tmp_path) -> None:
    """Records read before the statistics are known (a test split) are clamped by `preprocess`, so they stay finite."""
    from mmfuse.encoders.tabular import Z_MAX, TabularEncoder

    enc = TabularEncoder(numeric=["w"], stats={"w": {"mean": 0.0, "std": 1.0}}, dim=8, heads=2)
    z = enc.preprocess({"w": 3e38})["numeric"]
    assert z.tolist() == [Z_MAX]
    assert torch.isfinite(enc(enc.collate([enc.preprocess({"w": 3e38}), enc.preprocess({"w": -3e38})])).pooled).all()


def test_non_finite_outputs_are_refused_by_predict_with_one_line(table_run, tmp_path, capsys) -> None:
    """Whatever makes an output NaN (here a head weight, in a copy of the run), predict refuses: exit 2, one line."""
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(table_run, run)
    weights = load_file(run / "model.safetensors")
    name = next(k for k in weights if k.startswith("heads.spam") and k.endswith("weight"))
    weights[name][0, 0] = math.nan
    save_file(weights, run / "model.safetensors")
    records = tmp_path / "in.jsonl"
    records.write_text(json.dumps({"weight_kg": 3.0, "material": "wood", "vec": [0, 0, 0]}) + "\n")
    code, out, err = cli(["predict", str(run), "--input", str(records)], capsys)
    assert code == 2 and "nan" not in out.lower(), (out, err)
    assert err.strip() == (
        "mmfuse predict: error: the model's output for task 'spam' is not finite (NaN or infinite) for 1 of 1 "
        "record(s), most often an input far outside the training data; no answer is given"
    ), err


@pytest.mark.parametrize("kind", TASK_KINDS.names())
def test_every_task_kind_refuses_non_finite_logits(kind: str) -> None:
    from mmfuse.data import DataError

    options = {"classes": ["a", "b", "c"]} if kind in ("multiclass", "multilabel") else {}
    task = build_task("t", kind, **options)
    logits = torch.zeros(3, task.out_dim)
    task.predict(logits)  # finite: fine
    logits[1, 0] = math.nan
    logits[2, -1] = math.inf
    with pytest.raises(DataError, match="for 2 of 3 record") as info:
        task.predict(logits)
    assert info.value.rows == [1, 2]


def test_binary_tasks_answer_with_the_datas_own_labels(table_run, tmp_path, capsys) -> None:
    cfg = yaml.safe_load((table_run / "config.yaml").read_text())
    assert cfg["tasks"]["spam"]["classes"] == ["no", "yes"]
    code, out, err = cli(
        ["predict", str(table_run), "--field", "weight_kg=3", "--field", "material=wood", "--field", "vec=[0,0,0]"],
        capsys,
    )
    assert code == 0, err
    line = next(li for li in out.splitlines() if li.strip().startswith("spam:"))
    label = line.split(":", 1)[1].split()[0]
    assert label in ("no", "yes"), line
    assert "(no " in line or "(yes " in line, line


@pytest.mark.parametrize(
    ("labels", "classes"),
    [
        (["yes", "no", "yes"], ["no", "yes"]),
        (["spam", "ham", "spam"], ["ham", "spam"]),
        ([1, 0, 1], ["0", "1"]),
        ([True, False], ["false", "true"]),
        (["True", "False", "True"], ["False", "True"]),
        (["No", "Yes", "yes", "Yes"], ["No", "Yes"]),
        (["yes", "yes"], None),  # one class only: the default, validation decides
        (["a", "b", "c"], None),  # three names: the default; validation names the rows it cannot read
    ],
)
def test_binary_fit_learns_the_two_class_names(labels: list[Any], classes: list[str] | None) -> None:
    learned = TASK_KINDS.get("binary").fit(labels, {"classes": None})
    assert learned.get("classes") == classes
    task = build_task("t", "binary", classes=learned.get("classes"))
    if classes is not None:  # 0/1/true/false keep working next to the learned names
        assert [task.encode(x) for x in (classes[0], classes[1], 0, 1, "false", "true")] == [0, 1, 0, 1, 0, 1]
    assert TASK_KINDS.get("binary").fit(labels, {"classes": ["n", "p"]}) == {}


@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_predict_batch_size_below_one_is_a_usage_error(table_run, capsys, value: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["predict", str(table_run), "--field", "weight_kg=3", "--batch-size", value])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        info.value.code == 2
        and err == f"mmfuse predict: error: argument --batch-size: expected an integer >= 1, got {value!r}"
    )


def test_serve_answers_binary_tasks_with_the_datas_own_labels(table_run) -> None:
    """The server (and so its demo page, which shows the server's labels) answers 'yes'/'no', as predict does."""
    import urllib.request

    from mmfuse.serve import ServeOptions, Server

    server = Server(table_run, ServeOptions(port=0, device="cpu"))
    server.start()
    try:
        body = json.dumps({"weight_kg": 3, "material": "wood", "vec": [0, 0, 0]}).encode()
        request = urllib.request.Request(
            server.url + "/predict", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
    finally:
        server.stop()
    spam = reply["spam"]  # one record in, one result out: {task: {"label", "probabilities"}}
    assert spam["label"] in ("no", "yes"), reply
    assert set(spam["probabilities"]) == {"no", "yes"}, reply
