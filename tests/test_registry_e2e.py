"""Every registered encoder, end to end through the command line: records -> validation -> feature cache ->
dataset and collation -> model -> `train`, `evaluate` (cached and uncached agree) and `predict` (a file and
field values). Built from each encoder's tiny recipe (tests/recipes/), so a new encoder is covered the moment
it is registered with a recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from mmfuse.cli import main
from mmfuse.encoders import ENCODERS
from recipes import load_recipes

RECIPES = load_recipes()
CLASSES = ["a", "b", "c"]
N = 30


def write_records(root: Path, name: str) -> Path:
    """N records whose `m` input shows its class (i % 3); the label field is `label`."""
    rows = [{**RECIPES[name].row(i, root, "m"), "label": CLASSES[i % 3]} for i in range(N)]
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(root: Path, name: str, records: Path) -> Path:
    recipe = RECIPES[name]
    cfg = {
        "name": f"e2e-{name}",
        "model": {
            "encoders": {"m": {"name": name, **recipe.options, "freeze": True, **recipe.extra}},
            "fusion": {"name": "concat", "output_dim": 8},
        },
        "tasks": {"label": {"kind": "multiclass"}},
        "data": {
            "source": "records",
            "path": str(records),
            "val_fraction": 0.2,
            "test_fraction": 0.2,
            "batch_size": 8,
            "num_workers": 0,
        },
        "train": {
            "max_epochs": 2,
            "lr": 0.01,
            "accelerator": os.environ.get("MMFUSE_TEST_ACCELERATOR", "cpu"),
            "progress_bar": False,
            "cache_dir": str(root / "cache"),
        },
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_through_train_evaluate_and_predict(name: str, tmp_path: Path, capsys, monkeypatch) -> None:
    assert name in RECIPES, f"add tests/recipes/{name}.py"
    data = tmp_path / "data"
    data.mkdir()
    records = write_records(data, name)
    cfg = write_config(tmp_path, name, records)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 0, capsys.readouterr().err
    summary = json.loads((run / "metrics.json").read_text())
    assert set(summary["metrics"]["test"]["label"]) == {"accuracy", "macro_f1"}
    assert summary["records"] == {"train": 18, "val": 6, "test": 6}
    assert any((tmp_path / "cache").rglob("shard_*.safetensors")), "the frozen encoder's features were not cached"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["tasks"]["label"]["classes"] == CLASSES

    # the uncached path (dataset -> collate -> encoder) gives the metrics of the cached one
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "--set", "train.cache=false"]) == 0
    live = json.loads(capsys.readouterr().out)
    for metric, value in summary["metrics"]["test"]["label"].items():
        assert live["label"][metric] == pytest.approx(value, abs=1e-4), metric

    # predict from a file (labels ignored) and from field values
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", str(run), "--input", str(records), "--output", str(preds)]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == N and all(r["label"]["label"] in CLASSES for r in rows)
    fields = RECIPES[name].row(0, data, "m")
    args = [f"--field={k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in fields.items()]
    monkeypatch.chdir(data)  # field values are read relative to the current folder
    capsys.readouterr()
    assert main(["predict", str(run), *args]) == 0
    assert capsys.readouterr().out.strip().startswith("label: ")


def test_predict_shorthands_follow_the_configured_field_and_unread_fields_are_refused(tmp_path: Path, capsys) -> None:
    records = write_records(tmp_path, "hf_text")
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    records.write_text("".join(json.dumps({"caption": r.pop("m"), **r}) + "\n" for r in lines))
    cfg = yaml.safe_load(write_config(tmp_path, "hf_text", records).read_text())
    cfg["model"]["encoders"] = {"text": {**cfg["model"]["encoders"]["m"], "field": "caption"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(run), "--set", "train.max_epochs=1"]) == 0
    capsys.readouterr()
    assert main(["predict", str(run), "--text", "apple pie"]) == 0  # --text: the field of the `text` modality
    assert main(["predict", str(run), "--field", "caption=apple pie"]) == 0
    assert capsys.readouterr().out.count("label: ") == 2
    assert main(["predict", str(run), "--image", "x.png", "--text", "apple pie"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not read 'image'" in err and "text (field 'caption')" in err
    # records whose fields are misspelled carry none of the run's inputs: refused, or skipped with --skip-bad
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"captoin": "hello"}) + "\n" + json.dumps({"caption": "apple pie"}) + "\n")
    assert main(["predict", str(run), "--input", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("bad.jsonl:1: field 'captoin' is not an input of this run; did you mean 'caption'?")
    bad.write_text(json.dumps({"words": "hello"}) + "\n")  # not a likely typo: the plain line
    assert main(["predict", str(run), "--input", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("bad.jsonl:1: none of the run's inputs is given; it reads text (field 'caption')")
    bad.write_text(json.dumps({"captoin": "hello"}) + "\n" + json.dumps({"caption": "apple pie"}) + "\n")
    assert main(["predict", str(run), "--input", str(bad), "--skip-bad", "--output", str(tmp_path / "p.jsonl")]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 1
    assert "skipped" in capsys.readouterr().err


def test_a_new_task_kind_is_one_class(tmp_path: Path, capsys, monkeypatch) -> None:
    """A kind defined here (Poisson counts), registered, goes through config, data, training, metrics and predict."""
    import torch
    import torch.nn.functional as F
    import torchmetrics

    from mmfuse.tasks import TASK_KINDS, LabelError, Task

    class CountTask(Task):
        """Non-negative counts, Poisson loss on a log-rate."""

        kind, default_metric = "count", "mae"

        @property
        def out_dim(self) -> int:
            return 1

        def encode(self, raw):
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                raise LabelError(f"count {raw!r} is not a non-negative integer")
            return float(raw)

        def loss(self, logits, target):
            return F.poisson_nll_loss(logits.squeeze(-1), target)

        def metrics(self):
            return torchmetrics.MetricCollection({"mae": torchmetrics.MeanAbsoluteError()})

        def metric_input(self, logits, target):
            return logits.squeeze(-1).exp(), target

        def predict(self, logits):
            return {"prediction": logits.squeeze(-1).exp()}

        def describe(self, pred, i):
            return {"count": float(pred["prediction"][i])}

        def format(self, described, top=3):
            return f"{described['count']:.1f}"

    monkeypatch.setitem(TASK_KINDS._items, "count", CountTask)
    records = write_records(tmp_path, "hf_text")
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    records.write_text("".join(json.dumps({**r, "n": i % 4}) + "\n" for i, r in enumerate(lines)))
    cfg = yaml.safe_load(write_config(tmp_path, "hf_text", records).read_text())
    cfg["tasks"]["n"] = {"kind": "count"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(run), "--set", "train.max_epochs=1"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]["test"]
    assert set(metrics["n"]) == {"mae"} and torch.isfinite(torch.tensor(metrics["n"]["mae"]))
    capsys.readouterr()
    assert main(["predict", str(run), "--field", "m=apple pie"]) == 0
    out = capsys.readouterr().out
    assert "n: " in out and "label: " in out
    # its labels are validated by its own rule, with the file and row
    bad = records.read_text().splitlines()
    bad[3] = json.dumps({**json.loads(bad[3]), "n": -2})
    records.write_text("\n".join(bad) + "\n")
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "bad")]) == 2
    assert "records.jsonl:4: task 'n': count -2 is not a non-negative integer" in capsys.readouterr().err
