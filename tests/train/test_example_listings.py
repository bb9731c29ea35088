"""The README's worked example end to end: the shipped `listings.yaml` (image + text + table, three tasks)
trained through the CLI with tiny encoders, evaluated, and predicted from a JSONL file.

The generated listings make each input necessary for one task: the colour is only in the photo, whether
the buyer recommends it only in the review, and the price only in the table (weight and material).
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmfuse.cli import main

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
GOOD, BAD = ["great", "excellent"], ["awful", "broken"]
NOUNS, FILLERS = ["lamp", "chair", "box", "shelf"], ["arrived on time", "as described", "bought it last week", ""]
MATERIALS = {"wood": 0.5, "steel": 1.5, "plastic": 0.0}
pytestmark = pytest.mark.slow  # trains a three-input model for 40 epochs (about 30 s on one core)
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 37, "vocab_size": 30522}  # fmt: skip


def price_of(weight: float, material: str) -> float:
    return round(1.0 + 0.8 * weight + MATERIALS[material], 3)


def listing(i: int, rng: np.random.Generator, root: Path) -> dict[str, Any]:
    """Listing i: a photo (its colour, with a random darker patch), a review, a table row and the three labels."""
    color = list(COLORS)[i % 3]
    arr = np.full((24, 24, 3), COLORS[color], dtype=np.uint8)
    y, x = rng.integers(0, 16, size=2)
    arr[y : y + 8, x : x + 8] //= 2
    (root / "photos").mkdir(exist_ok=True)
    Image.fromarray(arr).save(root / "photos" / f"{i}.png")
    good = bool(rng.random() < 0.5)
    text = f"{rng.choice(GOOD if good else BAD)} {rng.choice(NOUNS)} {rng.choice(FILLERS)}".strip()
    weight, material = round(float(rng.uniform(0.5, 4.0)), 2), str(rng.choice(list(MATERIALS)))
    age = None if i % 6 == 5 else int(rng.integers(0, 10))  # an irrelevant column with missing cells
    return {"image": f"photos/{i}.png", "text": text, "weight_kg": weight, "age_years": age, "material": material,
            "color": color, "recommended": int(good), "price": price_of(weight, material)}  # fmt: skip


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def listings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("listings")
    rng = np.random.default_rng(0)
    rows = [listing(i, rng, root) for i in range(180)]
    splits = {"train": rows[:120], "val": rows[120:150], "test": rows[150:]}
    for name, part in splits.items():
        write_jsonl(root / f"{name}.jsonl", part)
    return {"root": root, **splits}  # type: ignore[dict-item]


def example_config(root: Path) -> dict[str, Any]:
    """The shipped example with tiny random-weight image and text encoders (the table encoder as shipped)."""
    cfg = yaml.safe_load((resources.files("mmfuse") / "configs" / "listings.yaml").read_text())
    cfg["model"]["encoders"]["image"] = {"name": "torchvision", "model": "resnet18", "image_size": 32, "freeze": True}
    cfg["model"]["encoders"]["text"] = {"name": "hf_text", "config": TINY_BERT, "max_length": 16, "freeze": True}
    cfg["data"].update({s: str(root / f"{s}.jsonl") for s in ("train", "val", "test")}, batch_size=16)
    cfg["data"]["num_workers"] = 0
    # random-weight stand-ins give weaker features than the packaged encoders: more steps, a larger step size
    cfg["train"].update(max_epochs=40, lr=0.01, progress_bar=False, accelerator="cpu")
    return cfg


@pytest.fixture(scope="module", autouse=True)
def _module_setup(tmp_path_factory: pytest.TempPathFactory):
    """A feature cache of this module's own (the module-scoped run starts before the per-test one), and one
    thread: for tiny models a second one only adds synchronisation (many times slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("listings-cache")))
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(listings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(example_config(listings["root"])))
    assert main(["train", str(tmp / "cfg.yaml"), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def scores(rows: list[dict[str, Any]], preds: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of colour and recommendation, RMSE of price, computed here from the predictions."""
    color = np.mean([p["color"]["label"] == r["color"] for r, p in zip(rows, preds, strict=True)])
    rec = np.mean([str(p["recommended"]["label"]) == str(r["recommended"]) for r, p in zip(rows, preds, strict=True)])
    err = [p["price"]["value"] - r["price"] for r, p in zip(rows, preds, strict=True)]
    return {"color": float(color), "recommended": float(rec), "price_rmse": math.sqrt(float(np.mean(np.square(err))))}


def predict(run: Path, rows: list[dict[str, Any]], tmp: Path, name: str, root: Path) -> list[dict[str, Any]]:
    """`mmfuse predict RUN --input FILE.jsonl --output ...` (inputs may be missing: --allow-missing)."""
    src, out = write_jsonl(root / f"{name}.jsonl", rows), tmp / f"{name}-preds.jsonl"
    assert main(["predict", str(run), "--input", str(src), "--output", str(out), "--allow-missing"]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_the_table_statistics_of_the_training_split_are_stored_in_the_run(run: Path, listings) -> None:
    table = yaml.safe_load((run / "config.yaml").read_text())["model"]["encoders"]["table"]
    for col in ("weight_kg", "age_years"):
        values = np.array([r[col] for r in listings["train"] if r[col] is not None], dtype=np.float64)
        assert table["stats"][col]["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert table["stats"][col]["std"] == pytest.approx(values.std(), rel=1e-9)
    assert table["categories"] == {"material": sorted({r["material"] for r in listings["train"]})}


def test_each_task_is_learned_from_its_own_input(run: Path, listings, tmp_path: Path) -> None:
    test, root = listings["test"], listings["root"]
    full = scores(test, predict(run, test, tmp_path, "full", root))
    prices = np.array([r["price"] for r in test])
    assert full["color"] >= 0.9 and full["recommended"] >= 0.9, full
    assert full["price_rmse"] < 0.35 * prices.std(), (full, prices.std())
    # take one input away at a time: the task that needs it falls to chance, which shows the model uses it
    no_image = scores(test, predict(run, [{**r, "image": None} for r in test], tmp_path, "no_image", root))
    no_text = scores(test, predict(run, [{**r, "text": None} for r in test], tmp_path, "no_text", root))
    blank = {"weight_kg": None, "age_years": None, "material": None}
    no_table = scores(test, predict(run, [{**r, **blank} for r in test], tmp_path, "no_table", root))
    assert no_image["color"] <= 0.6 and no_text["recommended"] <= 0.75, (no_image, no_text)
    assert no_table["price_rmse"] > 2 * full["price_rmse"], (no_table, full)


def test_evaluate_reproduces_the_test_metrics(run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "metrics.json").read_text())["metrics"]["test"]
    assert set(saved) == {"color", "recommended", "price"}
    for task, metrics in saved.items():
        for name, value in metrics.items():
            assert table[task][name] == pytest.approx(value, abs=1e-5), (task, name)


def test_predict_new_listings_from_jsonl(run: Path, listings, tmp_path: Path) -> None:
    rng, root = np.random.default_rng(1), listings["root"]
    rows = [listing(1000 + i, rng, root) for i in range(6)]
    rows[0]["material"] = "glass"  # never seen in training: the unknown bucket
    rows[1]["age_years"] = ""  # an empty cell
    for key in ("weight_kg", "age_years", "material"):  # no table at all: a missing input
        rows[2].pop(key)
    preds = predict(run, [{k: v for k, v in r.items() if k not in ("color", "recommended", "price")} for r in rows],
                    tmp_path, "new", root)  # fmt: skip
    assert len(preds) == 6
    for pred in preds:
        assert set(pred) >= {"color", "recommended", "price"} and math.isfinite(pred["price"]["value"])
        assert sum(pred["color"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert [p["color"]["label"] for p in preds] == [r["color"] for r in rows]
    for r, p in zip(rows[3:], preds[3:], strict=True):  # complete rows: the price is close
        assert abs(p["price"]["value"] - r["price"]) < 1.0, (r, p)


def test_a_table_column_without_training_values_is_one_config_error(listings, tmp_path: Path, capsys) -> None:
    cfg = example_config(listings["root"])
    cfg["model"]["encoders"]["table"]["numeric"] = ["weight_kg", "weight_lbs"]  # not in the records
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "mmfuse train: error: model.encoders.table: numeric column 'weight_lbs' has no value in any of the 120 "
        "training records: check its name against the records' fields"
    )
