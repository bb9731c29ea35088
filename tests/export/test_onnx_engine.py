"""`mmfuse predict --engine onnx`: the run's ONNX export with onnxruntime, without torch (src/mmfuse/export/runtime.py).

Through the command line: the same answers as `--engine torch` on tiny trained runs (every task kind; image + text,
table + vector), no torch/transformers/timm/Lightning in the process, the same refusals of bad records, and one-line
refusals of what the engine cannot do (`--engine auto` then predicts with torch and says so).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmfuse.cli import main
from tiny import run_config, write_dataset

SRC = str(Path(__file__).resolve().parents[2] / "src")
HEAVY = ["torch", "torchvision", "transformers", "timm", "lightning", "pytorch_lightning", "torchmetrics"]

# mmfuse.cli.main(argv) in a fresh interpreter (optionally with a package made unimportable); prints its exit code,
# stdout, stderr and the heavy modules imported by the end.
PROBE = """
import contextlib, io, json, sys
for name in json.loads(sys.argv[2]):
    sys.modules[name] = None  # importlib.util.find_spec(name) is None: as if not installed
from mmfuse.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main(json.loads(sys.argv[1]))
heavy = [m for m in json.loads(sys.argv[3]) if sys.modules.get(m) is not None]
print(json.dumps({"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "heavy": heavy}))
"""


def fresh(argv: list[str], cwd: Path, hidden: tuple[str, ...] = ()) -> dict[str, Any]:
    """`mmfuse ARGV` in a new process: {"rc", "out", "err", "heavy": the heavy modules it imported}."""
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(list(hidden)), json.dumps(HEAVY)]
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cli(*argv: str) -> tuple[int, str, str]:
    """`mmfuse ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def train_and_export(root: Path, config: dict[str, Any]) -> Path:
    """Train `config` (1 epoch) into root/run and export it to ONNX into root/run/export (the default folder)."""
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    code, _, err = cli("train", str(root / "cfg.yaml"), "--out", str(root / "run"))
    assert code == 0, err
    code, out, err = cli("export", str(root / "run"))
    assert code == 0, err
    assert out.startswith(f"exported {root / 'run' / 'export' / 'model.onnx'}")
    return root / "run"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 at 32 px + a tiny BERT (the packaged MiniLM tokenizer); multiclass, binary, regression, multilabel."""
    root = tmp_path_factory.mktemp("onnx-engine")
    config = run_config(write_dataset(root / "data", n=24), max_epochs=1, cache_dir=str(root / "cache"))
    return train_and_export(root, config)


def predictions(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_answers(want: list[dict[str, Any]], got: list[dict[str, Any]], tolerance: float = 1e-5) -> None:
    """Same records, tasks, answers and class order; probabilities (or values) within `tolerance`."""
    assert [w["source"] for w in want] == [g["source"] for g in got]
    for w, g in zip(want, got, strict=True):
        assert list(w) == list(g)
        for task in set(w) - {"source"}:
            a, b = w[task], g[task]
            assert set(a) == set(b), task
            for key in ("label", "labels"):
                assert a.get(key) == b.get(key), (w["source"], task)
            if "value" in a:
                assert abs(a["value"] - b["value"]) <= 1e-4 * max(1.0, abs(a["value"]))
            else:
                assert list(a["probabilities"]) == list(b["probabilities"])
                assert max(abs(p - b["probabilities"][c]) for c, p in a["probabilities"].items()) <= tolerance


def test_the_onnx_engine_answers_as_the_torch_engine_without_importing_torch(run: Path, tmp_path: Path) -> None:
    records = run.parent / "data" / "records.jsonl"
    code, _, err = cli(
        "predict", str(run), "--engine", "torch", "--input", str(records), "--output", str(tmp_path / "t")
    )
    assert code == 0, err
    argv = ["predict", str(run), "--engine", "onnx", "--input", str(records), "--output", str(tmp_path / "o")]
    got = fresh(argv, cwd=tmp_path)
    assert got["rc"] == 0 and got["heavy"] == [], got
    want = predictions(tmp_path / "t")
    assert len(want) == 24 and {"color", "is_question", "size", "tags"} <= set(want[0])
    assert_same_answers(want, predictions(tmp_path / "o"))


def test_auto_is_the_default_and_runs_a_current_export_without_torch(run: Path) -> None:
    data = run.parent / "data"
    argv = ["-v", "predict", str(run), "--image", "images/3.png", "--text", "is this a square?"]
    got = fresh(argv, cwd=data)
    assert got["rc"] == 0 and got["heavy"] == []
    assert f"engine: onnx ({run / 'export' / 'model.onnx'}, onnxruntime)" in got["err"]
    code, want, _ = cli("predict", str(run), "--engine", "torch", "--field", f"image={data / 'images/3.png'}",
                        "--field", "text=is this a square?")  # fmt: skip
    assert code == 0 and [line.split("   (")[0] for line in got["out"].splitlines()] == [
        line.split("   (")[0] for line in want.splitlines()
    ]  # the same answer per task (the probabilities shown agree to their 3 decimals but for rounding ties)


def test_images_of_any_shape_and_mode_are_preprocessed_as_the_torch_engine_does(run: Path, tmp_path: Path) -> None:
    """Tall, wide and small images (the resize and the centre crop), and the modes the decoder converts."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = {  # Pillow's modes: RGB, RGBA, L, I;16, RGB
        "tall.png": rng.integers(0, 256, (37, 23, 3), dtype=np.uint8),
        "wide.png": rng.integers(0, 256, (19, 50, 4), dtype=np.uint8),
        "grey.png": rng.integers(0, 256, (64, 33), dtype=np.uint8),
        "deep.png": rng.integers(0, 4096, (40, 41), dtype=np.uint16),
        "tiny.jpg": rng.integers(0, 256, (7, 9, 3), dtype=np.uint8),
    }
    for name, array in pixels.items():
        Image.fromarray(array).save(tmp_path / name)
    rows = [{"image": name, "text": text} for name in pixels for text in ("a square", "is this a square?")]
    (tmp_path / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["predict", str(run), "--input", str(tmp_path / "images.jsonl"), "--output"]
    assert cli(*argv, str(tmp_path / "t"), "--engine", "torch")[0] == 0
    got = fresh([*argv, str(tmp_path / "o"), "--engine", "onnx"], cwd=tmp_path)
    assert got["rc"] == 0 and got["heavy"] == []
    assert_same_answers(predictions(tmp_path / "t"), predictions(tmp_path / "o"))


def test_bad_records_are_refused_as_the_torch_engine_refuses_them(run: Path, tmp_path: Path) -> None:
    rows = [
        {"image": "images/0.png", "text": "a square"},
        {"image": "images/nope.png", "text": "a square"},  # no such file
        {"image": "images/1.png", "txet": "a square"},  # a typo of an input field
        {"image": "images/2.png", "text": 7},  # not a string
        {"image": "../outside.png", "text": "a square"},  # outside the data folder
        {"image": "images/4.png"},  # lacks the text: the model was trained with both
        {"id": 3},  # none of the inputs
    ]
    data = run.parent / "data"
    (data / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["predict", str(run), "--input", str(data / "mixed.jsonl"), "--skip-bad"]
    code, want_out, want_err = cli(*argv, "--engine", "torch")
    got = fresh([*argv, "--engine", "onnx"], cwd=tmp_path)
    assert code == got["rc"] == 0
    skipped = [line for line in want_err.splitlines() if line.startswith("skipped ")]  # the warning line, then each
    assert len(skipped) == 7 and skipped == [line for line in got["err"].splitlines() if line.startswith("skipped ")]
    assert [line.split("   (")[0] for line in got["out"].splitlines()] == [
        line.split("   (")[0] for line in want_out.splitlines()
    ]


def test_a_table_and_vector_run_answers_as_the_torch_engine(tmp_path: Path) -> None:
    rows = [
        {"age": 20.0 + 3 * i if i % 5 else None, "city": "abcd"[i % 4] if i % 6 != 1 else "",
         "vec": [i / 10, 1.0, -i / 7], "label": "xy"[i % 2], "score": i / 3}
        for i in range(24)
    ]  # fmt: skip
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = {"name": "tabular", "numeric": ["age"], "categorical": ["city"], "dim": 8, "heads": 2}
    config = {
        "name": "table",
        "model": {
            "encoders": {"table": table, "vec": {"name": "embedding", "dim": 3, "project": 4}},
            "fusion": {"name": "concat", "output_dim": 4},
        },
        "tasks": {"label": {"kind": "multiclass"}, "score": {"kind": "regression"}},
        "data": {"source": "records", "path": str(tmp_path / "records.jsonl"), "val_fraction": 0.25},
        "train": {"max_epochs": 1, "progress_bar": False, "cache_dir": str(tmp_path / "cache")},
    }
    run = train_and_export(tmp_path, config)
    new = [{"age": 90.5, "city": "z", "vec": [0.5, 0.0, 2.0]}, {"city": "b", "vec": [1, 2, 3]}]  # unseen, missing
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6] + new))
    argv = ["predict", str(run), "--input", str(tmp_path / "new.jsonl"), "--output"]
    assert cli(*argv, str(tmp_path / "t"), "--engine", "torch")[0] == 0
    got = fresh([*argv, str(tmp_path / "o"), "--engine", "onnx"], cwd=tmp_path)
    assert got["rc"] == 0 and got["heavy"] == []
    assert_same_answers(predictions(tmp_path / "t"), predictions(tmp_path / "o"))


@pytest.fixture
def copy(run: Path, tmp_path: Path) -> Path:
    """A copy of the exported run, free to damage."""
    shutil.copytree(run.parent / "data", tmp_path / "data")
    return Path(shutil.copytree(run, tmp_path / "run"))


def one_record(run: Path, *extra: str, verbose: bool = False) -> tuple[int, str, str]:
    image = run.parent / "data" / "images" / "0.png"
    return cli(*["-v"] * verbose, "predict", str(run), "--image", str(image), "--text", "a square", *extra)


def refused(run: Path, *extra: str) -> str:
    """The one-line refusal (exit 2) of a one-record predict with `extra` options."""
    code, out, err = one_record(run, *extra)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_a_run_without_an_export_is_refused_by_onnx_and_predicted_by_auto_with_torch(copy: Path) -> None:
    shutil.rmtree(copy / "export")
    assert refused(copy, "--engine", "onnx") == (
        f"mmfuse predict: error: {copy}: no ONNX export in {copy / 'export'} (write one with `mmfuse export "
        f"{copy}`), or predict with --engine torch"
    )
    code, out, err = one_record(copy, "--engine", "auto")
    assert code == 0 and "color: " in out
    code, _, err = one_record(copy, verbose=True)
    assert code == 0 and "engine: torch, not onnx: " in err and "engine: torch (" in err


def test_an_export_older_than_the_checkpoint_is_refused(copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(copy / "model.safetensors"))
    name = next(k for k in state if k.startswith("heads."))
    state[name] = state[name] + 1  # trained again after the export
    save_file(state, str(copy / "model.safetensors"))
    assert refused(copy, "--engine", "onnx") == (
        f"mmfuse predict: error: {copy / 'export' / 'export.json'}: older than the run's checkpoint "
        f"{copy / 'model.safetensors'} (other weights): export it again (`mmfuse export {copy}`) or predict with "
        "--engine torch"
    )
    code, out, err = one_record(copy, verbose=True)  # auto: the torch engine, saying why
    assert code == 0 and "color: " in out and "engine: torch, not onnx: " in err and "older than the run's" in err


def test_a_copied_run_with_the_same_weights_is_current_and_another_config_is_not(copy: Path) -> None:
    os.utime(copy / "model.safetensors", ns=(1, 1))  # other mtime, same bytes
    assert one_record(copy, "--engine", "onnx")[0] == 0
    with open(copy / "config.yaml", "a") as f:
        f.write("# edited\n")
    assert "exported from another config.yaml than" in refused(copy, "--engine", "onnx")


def test_an_input_the_engine_cannot_preprocess_and_an_old_export_json_are_named(copy: Path) -> None:
    path = copy / "export" / "export.json"
    info = json.loads(path.read_text())
    info["reading"]["inputs"]["image"]["reads"] = None  # as for an encoder of an unknown family
    path.write_text(json.dumps(info))
    assert refused(copy, "--engine", "onnx") == (
        f"mmfuse predict: error: {path}: input 'image' is read by TorchvisionImageEncoder, which the onnx engine "
        "cannot preprocess (it knows image files, texts, table rows and vectors); predict with --engine torch"
    )
    del info["reading"]
    path.write_text(json.dumps(info))
    assert f"{path}: no 'reading' key (written by an mmfuse before the onnx engine)" in refused(
        copy, "--engine", "onnx"
    )


def test_onnxruntime_missing_is_one_line_and_auto_uses_torch(run: Path, tmp_path: Path) -> None:
    argv = ["predict", str(run), "--image", str(run.parent / "data/images/0.png"), "--text", "a square"]
    got = fresh([*argv, "--engine", "onnx"], cwd=tmp_path, hidden=("onnxruntime",))
    assert got["rc"] == 2 and got["heavy"] == []
    assert got["err"] == (
        "mmfuse predict: error: the onnx engine needs onnxruntime (not installed): pip install 'mmfuse[export]', "
        "or predict with --engine torch\n"
    )
    got = fresh(["-v", *argv], cwd=tmp_path, hidden=("onnxruntime",))
    assert got["rc"] == 0 and "color: " in got["out"] and "engine: torch, not onnx: the onnx engine needs" in got["err"]


def test_a_record_lacking_an_input_is_refused_by_onnx_and_predicted_by_auto_with_torch(run: Path) -> None:
    argv = ["predict", str(run), "--text", "a square", "--allow-missing"]
    code, out, err = cli(*argv, "--engine", "onnx")
    assert code == 2 and err.strip() == (
        f"mmfuse predict: error: command line: no image input; the ONNX export ({run / 'export' / 'export.json'}) "
        "takes every input (the graph has no absent masks): predict it with --engine torch"
    )
    code, out, err = cli(*argv)
    assert code == 0 and "color: " in out and "predicting with the torch engine: command line: no image input" in err


def test_options_the_onnx_engine_does_not_take_are_refused(run: Path, tmp_path: Path) -> None:
    assert refused(run, "--engine", "torch", "--onnx", str(run / "export")) == (
        "mmfuse predict: error: --onnx names the export the onnx engine runs; it does not go with --engine torch"
    )
    code, _, err = cli("predict", str(run), "--input", str(tmp_path), "--engine", "onnx")
    assert code == 2 and f"{tmp_path} is a shard folder; the onnx engine reads records files and field values" in err
    other = Path(shutil.copytree(run / "export", tmp_path / "elsewhere"))
    assert one_record(run, "--engine", "onnx", "--onnx", str(other))[0] == 0  # an export folder named by --onnx
