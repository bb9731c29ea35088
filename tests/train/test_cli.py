"""End to end through the command line, on a few dozen records with tiny random-weight encoders."""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from mmfuse.cli import main
from tiny import run_config, write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), n=40)


def write_cfg(path: Path, records: Path, **train) -> Path:
    # module-scoped fixtures run before the per-test cache isolation: name a private cache explicitly
    cfg = run_config(records, **{"cache_dir": str(path.parent / "feature-cache"), **train})
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    cfg = write_cfg(tmp / "cfg.yaml", data)
    assert main(["train", str(cfg), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def test_train_writes_a_complete_run_directory(trained: Path) -> None:
    for name in (
        "config.yaml",
        "model.safetensors",
        "metrics.json",
        "report.md",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "logs/metrics.csv",
    ):
        assert (trained / name).exists(), name
    summary = json.loads((trained / "metrics.json").read_text())
    test = summary["metrics"]["test"]
    assert set(test) == {"color", "is_question", "size", "tags"}
    assert set(test["color"]) == {"accuracy", "macro_f1"} and set(test["size"]) == {"mae", "rmse"}
    assert set(test["is_question"]) == {"accuracy", "f1", "auroc"}
    resolved = yaml.safe_load((trained / "config.yaml").read_text())
    assert resolved["tasks"]["color"]["classes"] == ["blue", "green", "red"]
    assert resolved["tasks"]["tags"]["classes"] == ["bright", "square"]
    assert "| color |" in (trained / "report.md").read_text()


def test_evaluate_reproduces_the_test_metrics(trained: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(trained), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    saved = json.loads((trained / "metrics.json").read_text())["metrics"]["test"]
    for task, metrics in saved.items():
        for name, value in metrics.items():
            assert table[task][name] == pytest.approx(value, abs=1e-5), (task, name)


def test_predict_one_record_a_file_and_one_modality(trained: Path, data: Path, tmp_path: Path, capsys) -> None:
    image = data.parent / "images" / "0.png"
    capsys.readouterr()
    assert main(["predict", str(trained), "--image", str(image), "--text", "is this a square?"]) == 0
    out = capsys.readouterr().out
    assert "color:" in out and "is_question:" in out and "size:" in out
    # one modality only: refused on a model trained with both, unless asked for (then a warning)
    assert main(["predict", str(trained), "--text", "is this a square?"]) == 2
    assert "--allow-missing" in capsys.readouterr().err
    assert main(["predict", str(trained), "--text", "is this a square?", "--allow-missing"]) == 0
    assert "trained with every input present" in capsys.readouterr().err
    assert main(["predict", str(trained), "--image", str(image), "--allow-missing"]) == 0
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", str(trained), "--input", str(data), "--output", str(preds)]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 40
    probs = rows[0]["color"]["probabilities"]
    assert set(probs) == {"blue", "green", "red"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["color"]["label"] == max(probs, key=probs.get)


class Crash(RuntimeError):
    pass


def test_resume_continues_to_the_same_result(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfuse.train.module import MMFuseModule

    cfg = write_cfg(tmp_path / "cfg.yaml", data, max_epochs=3)
    assert main(["train", str(cfg), "--out", str(tmp_path / "straight")]) == 0
    original = MMFuseModule.on_train_epoch_start

    def crash_after_first_epoch(self: MMFuseModule) -> None:
        if self.current_epoch == 1:
            raise Crash("the machine went down")
        original(self)

    monkeypatch.setattr(MMFuseModule, "on_train_epoch_start", crash_after_first_epoch)
    assert main(["train", str(cfg), "--out", str(tmp_path / "cut")]) == 1  # the CLI reports the crash, exit 1
    monkeypatch.setattr(MMFuseModule, "on_train_epoch_start", original)
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a, b = load_file(tmp_path / "straight/model.safetensors"), load_file(tmp_path / "cut/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-6, key


def test_a_finished_run_is_never_overwritten(trained: Path, data: Path, tmp_path: Path, capsys) -> None:
    before = (trained / "checkpoints/best.ckpt").read_bytes()
    cfg = write_cfg(tmp_path / "cfg.yaml", data)
    assert main(["train", str(cfg), "--out", str(trained)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (trained / "checkpoints/best.ckpt").read_bytes() == before


def test_cache_gives_the_same_metrics_as_no_cache(tmp_path: Path, data: Path) -> None:
    cfg = write_cfg(tmp_path / "cfg.yaml", data)
    results = {}
    for cache in ("true", "false"):
        out = tmp_path / f"cache-{cache}"
        # (length-bucketed batches would change the batch order when text is not cached: same order here)
        args = ["--set", f"train.cache={cache}", "--set", "data.bucket_by_length=false"]
        assert main(["train", str(cfg), "--out", str(out), *args]) == 0
        results[cache] = json.loads((out / "metrics.json").read_text())["metrics"]["test"]
    for task, metrics in results["true"].items():
        for name, value in metrics.items():
            assert results["false"][task][name] == pytest.approx(value, abs=1e-4), (task, name)


def test_list_names_every_registry(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "torchvision",
        "hf_text",
        "timm",
        "film",
        "gated",
        "cross_attention",
        "multilabel",
        "pcgrad",
        "ogm_ge",
    ):
        assert name in out


def test_cache_info_and_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "c" / "0123456789abcdef0123").mkdir(parents=True)  # an encoder key folder and a shard
    (tmp_path / "c" / "0123456789abcdef0123" / "shard_00000.safetensors").write_bytes(b"0" * 1000)
    (tmp_path / "c" / ".mmfuse-cache").write_text("")
    assert main(["cache", "info", "--dir", str(tmp_path / "c")]) == 0
    assert "2 files" in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(tmp_path / "c")]) == 0
    assert not (tmp_path / "c").exists()


def test_help_explains_every_command(capsys: pytest.CaptureFixture) -> None:
    for cmd in ("train", "evaluate", "predict", "list", "cache", "bench"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "example" in capsys.readouterr().out


def test_a_checkpoint_from_a_different_config_is_refused(trained: Path, tmp_path: Path, capsys) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(trained, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["fusion"]["output_dim"] = 24
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["evaluate", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors" in err and "does not match" in err and "\n" not in err


# ----------------------------------------------------------------- bad input
def bad_copy(data: Path, tmp_path: Path, row: int, change: dict) -> Path:
    import shutil

    shutil.copytree(data.parent / "images", tmp_path / "images")
    lines = data.read_text().splitlines()
    rec = json.loads(lines[row - 1])
    rec.update(change)
    for k in [k for k, v in change.items() if v is ...]:
        del rec[k]
    lines[row - 1] = json.dumps(rec)
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


CASES = {
    "missing image file": ({"image": "images/nope.png"}, "not found"),
    "empty text": ({"text": "   "}, "text"),
    "non-text text": ({"text": 42}, "text"),
    "label not in classes": ({"tags": "square|round"}, "'round'"),
    "NaN regression target": ({"size": "nan"}, "not finite"),
    "missing required field": ({"image": ...}, "image"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_record_names_file_and_row(case: str, data: Path, tmp_path: Path, capsys) -> None:
    change, words = CASES[case]
    records = bad_copy(data, tmp_path, 5, change)
    cfg = run_config(records)
    cfg["tasks"]["tags"]["classes"] = ["bright", "square"]  # so an unknown tag is an error, not a new class
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "records.jsonl:5" in err and words in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
    # with --skip-bad the run goes on, and the report lists the record
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "skip"), "--skip-bad"]) == 0
    summary = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert summary["bad_records"] == 1
    assert "records.jsonl:5" in (tmp_path / "skip" / "report.md").read_text()


BAD_INPUT = {
    "image outside the data folder": ({"image": "../../../../etc/hostname"}, "outside the data folder"),
    "absolute image path": ({"image": "/etc/hostname"}, "outside the data folder"),
    "home image path": ({"image": "~/x.png"}, "outside the data folder"),
    "image name over 255 bytes": ({"image": "x" * 300 + ".png"}, "too long"),
    "lone surrogate in a text": ({"text": "bad \ud800 text"}, "surrogate"),
    "object label": ({"color": {"red": 1}}, "label is an object"),
    "list label of a multiclass task": ({"color": ["red"]}, "label is a list"),
    "very long label": ({"color": "r" * 100_000}, "100000 characters long"),
    "true as a regression target": ({"size": True}, "not a number"),
    "float32 overflow": ({"size": 1e308}, "overflows float32"),
    "400-digit target": ({"size": 10**400}, "too large"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_naming_file_and_row(case: str, data: Path, tmp_path: Path, capsys) -> None:
    change, words = BAD_INPUT[case]
    records = bad_copy(data, tmp_path, 5, change)
    cfg = run_config(records)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "records.jsonl:5" in err and words in err, err


def test_test_inputs_seen_in_training_are_reported(data: Path, tmp_path: Path) -> None:
    lines = data.read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(lines[25:35]) + "\n")  # 5 of 10 test records were trained on
    (tmp_path / "val.jsonl").write_text("\n".join(lines[35:]) + "\n")
    import shutil

    shutil.copytree(data.parent / "images", tmp_path / "images")
    cfg = run_config(tmp_path / "train.jsonl", max_epochs=1)
    files = {split: str(tmp_path / f"{split}.jsonl") for split in ("train", "val", "test")}
    cfg["data"].update(path=None, **files)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 0
    warnings = json.loads((tmp_path / "run" / "metrics.json").read_text())["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("5 of 10 test records share their 'image' input")
    assert "- warning: 5 of 10 test records" in (tmp_path / "run" / "report.md").read_text()


def test_truncated_image_names_file_and_row(data: Path, tmp_path: Path, capsys) -> None:
    records = bad_copy(data, tmp_path, 3, {})
    truncate(tmp_path / "images" / "2.png")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(run_config(records)))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "records.jsonl:3" in err and "2.png" in err


def test_unknown_config_key_is_one_line(data: Path, tmp_path: Path, capsys) -> None:
    cfg = write_cfg(tmp_path / "cfg.yaml", data)
    assert main(["train", str(cfg), "--set", "train.epochs=3", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmfuse train: error: train.epochs: unknown key") and "max_epochs" in err


def test_unreadable_image_at_predict_time(trained: Path, tmp_path: Path, capsys) -> None:
    import numpy as np

    bad = tmp_path / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(bad)
    truncate(bad)
    assert main(["predict", str(trained), "--image", str(bad), "--text", "hi"]) == 2
    assert "bad.png" in capsys.readouterr().err


@pytest.mark.parametrize("balance", ["ogm_ge", "modality_dropout"])
def test_modality_balancing_is_measured_per_epoch(balance: str, data: Path, tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "cfg.yaml", data)
    args = ["--set", f"train.balance={{name: {balance}}}", "--set", "model.fusion.adapters=true"]  # frozen: adapters
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), *args]) == 0
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    if balance == "ogm_ge":
        assert set(summary["metrics"]["test"]["unimodal"]) == {"image_accuracy", "text_accuracy"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## modality balance per epoch" in report
    assert ("coef/image" if balance == "ogm_ge" else "drop/image") in report


def test_an_encoder_for_a_modality_the_data_lacks_is_one_line(data: Path, tmp_path: Path, capsys) -> None:
    cfg = run_config(data)
    cfg["model"]["encoders"]["audio"] = dict(cfg["model"]["encoders"]["text"])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{data}: no field 'audio' for the 'audio' input" in err


def test_predict_does_not_import_the_trainer() -> None:
    import subprocess
    import sys

    code = (
        "import sys, mmfuse.predict, mmfuse.runs; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
        "or m.startswith('mmfuse.train')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_balancer_with_nothing_to_act_on_is_refused_before_any_feature_is_encoded(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # both encoders frozen and concat without adapters: no parameter belongs to one modality alone
    cfg = write_cfg(tmp_path / "cfg.yaml", data, balance={"name": "ogm_ge"})
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.balance: ogm_ge has nothing to act on" in err[0], err
    cache = tmp_path / "feature-cache"
    assert not cache.exists() or not any(cache.rglob("*.safetensors")), "features were encoded before the refusal"
