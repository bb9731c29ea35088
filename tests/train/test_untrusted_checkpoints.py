"""Files in a run directory are untrusted: nothing in them ever runs, and a bad one is one line and exit 2.

A pickle payload (an object whose `__reduce__` creates a marker file) is planted in the checkpoints that
`train --resume`, `evaluate`, `predict` and `bench` could read; damaged files give one line each.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mmfuse.cli import main
from tiny import run_config, write_dataset


class Payload:
    """Unpickling this creates `marker`: the proof that a load ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def plant(path: Path, marker: Path) -> None:
    """A checkpoint-shaped file whose unpickling runs the payload."""
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 0, "global_step": 0, "x": Payload(marker)}, path)


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The planted file does run code when loaded the unsafe way, so the tests below can fail."""
    plant(tmp_path / "p.ckpt", tmp_path / "marker")
    torch.load(tmp_path / "p.ckpt", weights_only=False)
    assert (tmp_path / "marker").exists()


def _train(root: Path) -> Path:
    records = write_dataset(root / "data", n=24)
    (root / "cfg.yaml").write_text(yaml.safe_dump(run_config(records, max_epochs=1)))
    assert main(["train", str(root / "cfg.yaml"), "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:  # runs before the per-test cache isolation: isolate it here too
        mp.setenv("MMFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))
        return _train(tmp_path_factory.mktemp("finished"))


@pytest.fixture
def run_dir(finished: Path, tmp_path: Path) -> Path:
    """A copy of a finished one-epoch run (its data stays where it was)."""
    shutil.copytree(finished.parent / "data", tmp_path / "data")
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def one_error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"mmfuse {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_resume_never_runs_a_pickled_payload_in_last_ckpt(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    marker = run_dir.parent / "marker"
    plant(run_dir / "checkpoints" / "last.ckpt", marker)
    capsys.readouterr()
    assert main(["train", "--out", str(run_dir), "--resume"]) == 2
    line = one_error_line(capsys, "train")
    assert "last.ckpt" in line and "refused" in line
    assert not marker.exists()


def test_resume_never_runs_a_pickled_payload_in_best_ckpt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """last.ckpt is sound and names best.ckpt (trained in place); the reload of the best weights refuses it."""
    run = _train(tmp_path)
    marker = tmp_path / "marker"
    plant(run / "checkpoints" / "best.ckpt", marker)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 2
    line = one_error_line(capsys, "train")
    assert "best.ckpt" in line and "refused" in line
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_resume_from_a_damaged_last_ckpt_is_one_line(run_dir: Path, capsys: pytest.CaptureFixture, damage: str) -> None:
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 100, "empty": b""}[damage])
    capsys.readouterr()
    assert main(["train", "--out", str(run_dir), "--resume"]) == 2
    assert "last.ckpt" in one_error_line(capsys, "train")


def test_evaluate_and_predict_never_read_the_checkpoints(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    marker = run_dir.parent / "marker"
    for name in ("best.ckpt", "last.ckpt"):
        plant(run_dir / "checkpoints" / name, marker)
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    image = run_dir.parent / "data" / "images" / "0.png"
    assert main(["predict", str(run_dir), "--image", str(image), "--text", "a square of colour"]) == 0
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_weights_are_one_line_for_evaluate_and_predict(
    run_dir: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    weights = run_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 2
    assert "model.safetensors" in one_error_line(capsys, "evaluate")
    image = run_dir.parent / "data" / "images" / "0.png"
    assert main(["predict", str(run_dir), "--image", str(image), "--text", "a square"]) == 2
    assert "model.safetensors" in one_error_line(capsys, "predict")


def test_a_yaml_payload_in_config_never_runs(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    marker = run_dir.parent / "marker"
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(f"boom: !!python/object/apply:pathlib.Path.touch [{marker}]\n" + text)
    capsys.readouterr()
    for argv in (["evaluate", str(run_dir)], ["train", "--out", str(run_dir), "--resume"]):
        assert main(argv) == 2
        one_error_line(capsys, argv[0])
    assert not marker.exists()


@pytest.mark.slow
def test_bench_resume_never_runs_a_pickled_payload(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = write_dataset(tmp_path / "data", n=24)
    cfg = run_config(records, max_epochs=1)
    cfg["tasks"] = {k: v for k, v in cfg["tasks"].items() if k in ("color", "size")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["bench", "mtl", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "bench")]
    assert main(argv) == 0
    # An interrupted run of the bench: no metrics.json, so the bench resumes it from its last.ckpt.
    run = next(p.parent for p in (tmp_path / "bench").rglob("metrics.json"))
    (run / "metrics.json").unlink()
    marker = tmp_path / "marker"
    plant(run / "checkpoints" / "last.ckpt", marker)
    capsys.readouterr()
    assert main(argv) == 2
    assert "refused" in one_error_line(capsys, "bench")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.precision", "fp8"),
        ("train.accelerator", "tpu9"),
        ("train.strategy", "ddp_spawnn"),
        ("train.devices", "0"),
    ],
)
def test_bad_train_values_are_one_config_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, key: str, value: str
) -> None:
    records = write_dataset(tmp_path / "data", n=8)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(run_config(records)))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--set", f"{key}={value}"]) == 2
    assert one_error_line(capsys, "train").startswith(f"mmfuse train: error: {key}: ")
    assert not (tmp_path / "run").exists()


def test_no_validation_records_keeps_the_last_epoch_and_says_so(tmp_path: Path) -> None:
    records = write_dataset(tmp_path / "data", n=16)
    cfg = run_config(records, max_epochs=2)
    cfg["data"]["val_fraction"] = 0.0
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["monitor"] is None and summary["best_checkpoint"].endswith("last.ckpt")
    assert "val" not in summary["metrics"] and "test" in summary["metrics"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "warning: no validation records, so no model selection" in report
    assert "by `None`" not in report
    # The exported weights are the last epoch's.
    from safetensors.torch import load_file

    from mmfuse.train.run import load_checkpoint

    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    exported = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(v, last[f"model.{k}"]) for k, v in exported.items())
    shutil.rmtree(tmp_path / "run")


@pytest.mark.parametrize("where", ["state_dict", "optimizer", "best_score"])
def test_resume_from_a_last_ckpt_with_a_wrong_entry_is_one_line(
    run_dir: Path, capsys: pytest.CaptureFixture, where: str
) -> None:
    """Entries that load with weights_only but are not what Lightning restores: one `error:` line, exit 2."""
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    if where == "state_dict":
        ckpt["state_dict"][next(iter(ckpt["state_dict"]))] = 1.5
    elif where == "optimizer":
        ckpt["optimizer_states"] = [{"state": {}, "param_groups": "x"}]
    else:
        key = next(k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint"))
        ckpt["callbacks"][key]["best_model_score"] = "x"
    torch.save(ckpt, last)
    capsys.readouterr()
    assert main(["train", "--out", str(run_dir), "--resume"]) == 2
    assert "last.ckpt" in one_error_line(capsys, "train")


@pytest.mark.parametrize("part", ["lr_schedulers", "optimizer_states"])
def test_resume_from_a_checkpoint_whose_state_does_not_restore_is_one_line(
    run_dir: Path, capsys: pytest.CaptureFixture, part: str
) -> None:
    """A file that loads but whose optimiser or scheduler state Lightning cannot restore (a foreign file)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt[part] = [{"foreign": 1}]
    torch.save(ckpt, last)
    capsys.readouterr()
    assert main(["train", "--out", str(run_dir), "--resume", "--set", "train.max_epochs=2"]) == 2
    line = one_error_line(capsys, "train")
    assert "last.ckpt: cannot resume from it: " in line
