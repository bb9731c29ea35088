"""A run directory is self-contained: moved or copied, it evaluates, predicts, loads for serving and resumes
from its own files (its checkpoints once named the absolute path of the original's best.ckpt)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmfuse.cli import main
from mmfuse.runs import open_run
from mmfuse.train.run import load_checkpoint


def _evaluate(run_dir: Path, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _weights_of_best(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, b[k]) for k, v in a.items() if k in b) and bool(set(a) & set(b))


def _resume(run_dir: Path, *sets: str) -> None:
    argv = ["train", "--out", str(run_dir), "--resume", *[x for s in sets for x in ("--set", s)]]
    assert main(argv) == 0


def test_the_run_directory_names_no_path_outside_itself(finished: Path) -> None:
    for name in ("best.ckpt", "last.ckpt"):
        assert str(finished.parent).encode() not in (finished / "checkpoints" / name).read_bytes(), name
    assert str(finished.parent) not in (finished / "report.md").read_text()
    assert json.loads((finished / "metrics.json").read_text())["best_checkpoint"] == "checkpoints/best.ckpt"


def test_a_moved_run_evaluates_predicts_loads_and_resumes(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    expected = _evaluate(finished, capsys)
    shutil.copytree(finished, tmp_path / "a")
    moved = (tmp_path / "a").rename(tmp_path / "moved")

    assert _evaluate(moved, capsys) == expected
    image = finished.parent / "data" / "images" / "0.png"
    assert main(["predict", str(moved), "--image", str(image), "--text", "a square of colour"]) == 0
    served = open_run(moved).model.state_dict()  # what `mmfuse serve` loads
    assert _same(load_file(str(finished / "model.safetensors")), served)

    _resume(moved)  # nothing left to train: the best weights are exported again, from the moved files
    assert _same(_weights_of_best(moved), load_file(str(moved / "model.safetensors")))
    _resume(moved, "train.max_epochs=3")
    summary = json.loads((moved / "metrics.json").read_text())
    assert summary["epochs"] == 3 and summary["best_checkpoint"] == "checkpoints/best.ckpt"
    assert load_checkpoint(moved / "checkpoints" / "last.ckpt")["epoch"] == 2
    assert _same(_weights_of_best(moved), load_file(str(moved / "model.safetensors")))


def test_a_copy_resumes_from_its_own_files_when_the_original_is_retrained_or_deleted(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(finished, a)
    shutil.copytree(a, b)
    ours = load_file(str(b / "model.safetensors"))
    shutil.rmtree(a)  # retrain the original: other weights under the same paths
    cfg = finished.parent / "cfg.yaml"
    assert main(["train", str(cfg), "--out", str(a), "--set", "seed=1", "--set", "model.fusion.output_dim=8"]) == 0
    theirs = load_file(str(a / "model.safetensors"))

    _resume(b)
    assert _same(ours, load_file(str(b / "model.safetensors")))
    assert not _same(theirs, load_file(str(b / "model.safetensors")))
    assert _evaluate(b, capsys) == _evaluate(finished, capsys)

    shutil.rmtree(a)
    _resume(b, "train.max_epochs=3")
    assert json.loads((b / "metrics.json").read_text())["epochs"] == 3
    assert _same(_weights_of_best(b), load_file(str(b / "model.safetensors")))
    assert _same(_weights_of_best(b), open_run(b).model.state_dict())
