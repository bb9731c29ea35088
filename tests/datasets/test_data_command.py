"""`mmfuse data relations` and `mmfuse data glyphs`: the sets written, the printed tables, scoring, and bad input
answered with one error line (exit 2) before anything is written or overwritten."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmfuse.cli import main

RELATIONS = ["--train-images", "3", "--val-images", "2", "--test-images", "4"]
GLYPHS = ["--train", "2", "--val", "1", "--test", "1", "--size", "16"]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line on stderr (asserted to be exactly one)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.fixture
def relations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A tiny relations set written by the command (3 / 2 / 4 scenes)."""
    out = tmp_path / "rel"
    assert main(["data", "relations", "--out", str(out), *RELATIONS]) == 0
    capsys.readouterr()  # the summary: each test reads only its own output
    return out


def _predictions(folder: Path, split: str, tmp_path: Path, right: bool) -> Path:
    """`mmfuse predict`-style output for every record of `split`: all right, or all wrong."""
    records = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
    path = tmp_path / f"{split}-preds.jsonl"
    answers = [r["answer"] if right else "not an answer" for r in records]
    path.write_text("".join(json.dumps({"answer": {"label": a}}) + "\n" for a in answers))
    return path


def test_relations_writes_the_set_and_prints_its_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rel"
    assert main(["data", "relations", "--out", str(out), *RELATIONS, "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"relations data set in {out}\n\nsplit ") and "text-only ceiling" in printed
    names = {p.name for p in out.iterdir()}
    assert names == {
        "images",
        "manifest.json",
        "scenes.jsonl",
        ".gitignore",
        *(f"{s}.jsonl" for s in ("train", "val", "test", "test_combo")),
    }
    params = json.loads((out / "manifest.json").read_text())["params"]
    assert (params["seed"], params["n_train_images"], params["n_val_images"], params["n_test_images"]) == (2, 3, 2, 4)
    assert len(list((out / "images" / "test").glob("*.png"))) == 4
    train = (out / "train.jsonl").read_text().splitlines()
    assert len(train) == 3 * 8 and f"\n{'train':<11} {3:>6}  {len(train):>9}  " in printed
    assert main(["data", "relations", "--out", str(out), *RELATIONS, "--seed", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["questions"] == len(train)


def test_relations_scores_predictions(relations: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    right = _predictions(relations, "test", tmp_path, right=True)
    assert main(["data", "relations", "--out", str(relations), "--score", str(right)]) == 0
    n = len((relations / "test.jsonl").read_text().splitlines())
    assert capsys.readouterr().out.startswith(f"test: answer accuracy 100.00% on {n} questions\n  ")
    wrong = _predictions(relations, "test_combo", tmp_path, right=False)
    argv = ["data", "relations", "--out", str(relations), "--score", str(wrong), "--split", "test_combo", "--json"]
    assert main(argv) == 0
    score = json.loads(capsys.readouterr().out)
    assert (score["split"], score["accuracy"]) == ("test_combo", 0.0) and score["questions"] > 0


def test_glyphs_writes_the_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gly"
    assert main(["data", "glyphs", "--out", str(out), *GLYPHS]) == 0
    assert capsys.readouterr().out == f"train: 6 records, val: 3 records, test: 3 records -> {out}\n"
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n and {r["question"] for r in rows} == {"digit", "even", "large"}
        assert Image.open(out / rows[0]["image"]).size == (16, 16)
    assert json.loads((out / "manifest.json").read_text())["images"] == {"train": 2, "val": 1, "test": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gly"]  # no temporary folder left behind


def test_a_folder_of_another_generation_is_refused(
    relations: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (relations / "train.jsonl").read_bytes()
    assert main(["data", "glyphs", "--out", str(relations), *GLYPHS]) == 2
    line = _error_line(capsys)
    assert (
        line
        == f"mmfuse data glyphs: error: {relations}: not empty and not a glyphs data set; choose an empty or new folder"
    )
    assert (relations / "train.jsonl").read_bytes() == before  # nothing overwritten
    glyphs = tmp_path / "gly"
    assert main(["data", "glyphs", "--out", str(glyphs), *GLYPHS]) == 0
    capsys.readouterr()
    assert main(["data", "relations", "--out", str(glyphs), *RELATIONS]) == 2
    assert _error_line(capsys).endswith(
        f"{glyphs}: not empty and not a relations data set; choose an empty or new folder"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--split", "val"], "mmfuse data relations: error: --split only acts with --score"),
        (["--score", "p.jsonl", "--seed", "1", "--test-images", "5"], "--seed, --test-images: for generating only"),
        (["--score", "missing.jsonl"], "missing.jsonl: predictions file not found"),
        (["--train-images", "0"], "need >= 1 image per split"),
    ],
)
def test_relations_bad_options_are_one_line(
    relations: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "relations", "--out", str(relations), *argv]) == 2
    assert message in _error_line(capsys)


def test_scoring_a_folder_without_the_set_says_how_to_generate_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.jsonl").write_text("{}\n")
    assert main(["data", "relations", "--out", str(tmp_path / "none"), "--score", str(tmp_path / "p.jsonl")]) == 2
    assert "not found; generate the set first (mmfuse data relations --out DIR)" in _error_line(capsys)


def test_glyphs_without_fonts_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mmfuse.datasets.glyphs as glyphs

    monkeypatch.setattr(glyphs, "FONT_DIR", tmp_path / "no-fonts")
    assert main(["data", "glyphs", "--out", str(tmp_path / "gly"), *GLYPHS]) == 2
    assert _error_line(capsys).endswith("no-fonts; install fonts-dejavu-core")
    assert not (tmp_path / "gly").exists()


# in this process the module is imported already (a real `python -m` starts fresh and warns of nothing)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize(
    "module", ["mmfuse.datasets.relations", "mmfuse.datasets.glyphs", "mmfuse.data.relations", "mmfuse.data.glyphs"]
)
def test_python_dash_m_runs_the_command(
    module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m` of each generator module (and of its deprecated alias in mmfuse.data) runs `mmfuse data`."""
    argv = RELATIONS if module.endswith("relations") else GLYPHS
    monkeypatch.setattr(sys, "argv", [module, "--out", str(tmp_path / "set"), *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(module, run_name="__main__")  # what `python -m` does
    assert done.value.code == 0
    assert (tmp_path / "set" / "manifest.json").is_file() and (tmp_path / "set" / "test.jsonl").is_file()
    assert capsys.readouterr().out.startswith("relations data set in" if module.endswith("relations") else "train: 6")
