"""`mmfuse export` (mmfuse.export): a tiny image+text run (random weights) to ONNX and TorchScript, checked on
batches of another size and text length than the traced one; export.json; one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmfuse.cli import main
from mmfuse.io import sha256_file
from tiny import run_config, write_dataset

TEXTS = ["red?", "what is the colour of this rather large square in the middle of the picture?", "a square", "x y"]


def make_run(root: Path, config: dict[str, Any]) -> Path:
    """A finished run directory (resolved config.yaml + model.safetensors) with random weights, without training."""
    from mmfuse.builders import build_model, build_run_data
    from mmfuse.config import dump_config, parse_config

    data = build_run_data(parse_config(config))
    torch.manual_seed(0)
    model = build_model(data.cfg)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(dump_config(data.cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    return root


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    return make_run(root / "run", run_config(write_dataset(root / "data", n=24)))


@pytest.fixture(scope="module", params=["onnx", "torchscript"])
def exported(request: pytest.FixtureRequest, run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp(f"exported-{request.param}") / "new" / "dir"  # created, parents too
    code, stdout, stderr = cli("export", str(run), "--format", request.param, "--out", str(out))
    assert code == 0, stderr
    return {
        "format": request.param,
        "out": out,
        "stdout": stdout,
        "info": json.loads((out / "export.json").read_text()),
    }


def other_batch(run: Path, texts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Records with these texts (the traced batch had 2 of the data set's): flat inputs by name, PyTorch's logits."""
    from mmfuse.runs import load_run

    model = load_run(run)
    images = sorted((run.parent / "data" / "images").glob("*.png"))[: len(texts)]
    img, txt = model.encoders["image"], model.encoders["text"]
    inputs = {
        "image": img.collate([img.preprocess(img.load(str(p))) for p in images]),
        "text": txt.collate([txt.preprocess(t) for t in texts]),
    }
    with torch.inference_mode():
        logits = model(inputs).logits
    flat = {"image": inputs["image"], **{f"text.{k}": v for k, v in inputs["text"].items()}}
    return flat, logits


def run_exported(exported: dict[str, Any], flat: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Run the exported file as a user would: onnxruntime by input name, or torch.jit.load in export.json order."""
    info = exported["info"]
    names = [o["name"] for o in info["outputs"]]
    path = exported["out"] / info["file"]
    if exported["format"] == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        results = session.run(names, {i["name"]: flat[i["name"]].numpy() for i in info["inputs"]})
    else:
        module = torch.jit.load(str(path))
        with torch.inference_mode():
            results = [t.numpy() for t in module(*(flat[i["name"]] for i in info["inputs"]))]
    return dict(zip(names, results, strict=True))


@pytest.mark.parametrize("texts", [[TEXTS[i % 4] for i in range(5)], [TEXTS[1]] * 3], ids=["padded", "unpadded"])
def test_exported_model_equals_pytorch_on_another_batch_size_and_text_length(
    exported: dict[str, Any], run: Path, texts: list[str]
):
    flat, want = other_batch(run, texts)
    assert flat["image"].shape[0] == len(texts) != exported["info"]["check"]["traced_records"]
    assert flat["text.input_ids"].shape[1] > 10  # the long text: longer than any text of the tiny data set
    assert bool(flat["text.attention_mask"].all()) == (len(set(texts)) == 1)  # padding, or none at all
    got = run_exported(exported, flat)
    assert set(got) == {"color", "is_question", "size", "tags"}
    for task, logits in want.items():
        assert got[task].shape == tuple(logits.shape)
        assert np.abs(got[task] - logits.numpy()).max() <= 1e-4, task
        assert (got[task].argmax(-1) == logits.numpy().argmax(-1)).all(), task
        assert ((got[task] > 0) == (logits.numpy() > 0)).all(), task


def test_export_prints_the_check(exported: dict[str, Any]):
    check = exported["info"]["check"]
    assert check["passed"] and check["records"] > 2 and check["max_abs_diff"] <= 1e-4
    assert "max |logit difference|" in exported["stdout"] and "passed" in exported["stdout"]
    for task in ("color", "is_question", "size", "tags"):
        assert f"  {task}" in exported["stdout"]
        assert check["tasks"][task]["same_decisions"]


def test_export_json_describes_inputs_preprocessing_and_outputs(exported: dict[str, Any], run: Path):
    import mmfuse

    info = exported["info"]
    assert info["format"] == exported["format"]
    assert info["exporter"] == ("dynamo" if exported["format"] == "onnx" else "torch.jit.trace")
    assert (exported["out"] / info["file"]).is_file()
    assert info["mmfuse_version"] == mmfuse.__version__
    assert info["config_sha256"] == sha256_file(run / "config.yaml")
    inputs = {i["name"]: i for i in info["inputs"]}
    assert inputs["image"] == {"name": "image", "modality": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}
    assert inputs["text.input_ids"]["shape"] == ["batch", "text_sequence"]
    assert inputs["text.input_ids"]["dtype"] == "int64" and "text.attention_mask" in inputs
    image, text = info["preprocessing"]["image"], info["preprocessing"]["text"]
    assert image["image_size"] == 32 and image["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert image["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert text["max_length"] == 16 and (Path(text["tokenizer"]) / "tokenizer.json").is_file()
    outputs = {o["name"]: o for o in info["outputs"]}
    assert outputs["color"]["kind"] == "multiclass" and outputs["color"]["classes"] == ["blue", "green", "red"]
    assert outputs["color"]["shape"] == ["batch", 3] and outputs["size"]["classes"] is None
    assert outputs["tags"]["kind"] == "multilabel" and outputs["is_question"]["kind"] == "binary"


def test_onnx_axes_are_named(exported: dict[str, Any]):
    if exported["format"] != "onnx":
        pytest.skip("ONNX only")
    import onnx

    graph = onnx.load(str(exported["out"] / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims["image"] == ["batch", 3, 32, 32] and dims["text.input_ids"] == ["batch", "text_sequence"]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 3]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}", "--out", "{tmp}/o"], "not a finished run directory (config.yaml is missing)"),
        (["{run}", "--format", "tflite", "--out", "{tmp}/o"], "unknown export format 'tflite'; choose one of onnx"),
        (["{run}", "--out", "{run}/config.yaml"], "config.yaml: --out must be a directory, and this is a file"),
    ],
)
def test_bad_requests_are_one_line(run: Path, tmp_path: Path, args: list[str], message: str):
    filled = [a.format(missing=tmp_path / "no_run", tmp=tmp_path, run=run) for a in args]
    code, stdout, stderr = cli("export", *filled)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("mmfuse export: error: ") and message in stderr
    assert not (tmp_path / "o").exists()


def test_a_missing_package_names_the_extra(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    code, _, stderr = cli("export", str(run), "--out", str(tmp_path / "o"))
    assert code == 2 and stderr.count("\n") == 1
    assert "needs onnxruntime (not installed): pip install 'mmfuse[export]'" in stderr


def test_an_encoder_with_data_dependent_control_flow_is_named_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from mmfuse.encoders.base import ENCODERS
    from mmfuse.encoders.embedding import EmbeddingEncoder

    class Branchy(EmbeddingEncoder):
        def forward(self, inputs: torch.Tensor):
            if inputs.sum() > 0:  # Python control flow on a tensor's value: a tracer would freeze one branch
                inputs = inputs * 2
            return super().forward(inputs)

    monkeypatch.setitem(ENCODERS._items, "zztest_branchy", Branchy)
    rows = [{"vec": [float(i), 1.0, -1.0], "label": "ab"[i % 2]} for i in range(12)]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "name": "branchy",
        "model": {
            "encoders": {"vec": {"name": "zztest_branchy", "dim": 3}},
            "fusion": {"name": "concat", "output_dim": 4},
        },
        "tasks": {"label": {"kind": "multiclass"}},
        "data": {"source": "records", "path": str(tmp_path / "records.jsonl"), "val_fraction": 0.25},
    }
    run = make_run(tmp_path / "run", config)
    for fmt in ("onnx", "torchscript"):
        code, stdout, stderr = cli("export", str(run), "--format", fmt, "--out", str(tmp_path / fmt))
        assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
        assert "cannot export: the vec encoder (Branchy) cannot be traced: " in stderr
        assert "data-dependent" in stderr and "if inputs.sum() > 0" in stderr
        assert not (tmp_path / fmt).exists()


def test_a_failed_check_is_one_line_and_keeps_no_file(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mmfuse.export.build

    monkeypatch.setattr(mmfuse.export.build, "TOLERANCE", -1.0)  # no difference passes: the check must fail
    code, stdout, stderr = cli("export", str(run), "--format", "torchscript", "--out", str(tmp_path / "o"))
    assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
    assert "the exported model disagrees with PyTorch, not kept: max |logit difference| " in stderr
    assert "(tolerance -1)" in stderr and not (tmp_path / "o").exists()


def test_request_errors_answer_before_torch_is_imported(run: Path, tmp_path: Path):
    from test_cli_startup import _probe

    argvs = [
        ["export", str(tmp_path / "no_run"), "--out", str(tmp_path / "o")],
        ["export", str(run), "--format", "tflite", "--out", str(tmp_path / "o")],
        ["export", str(run), "--out", str(run / "config.yaml")],
    ]
    for got in _probe(argvs, tmp_path):
        assert got["rc"] == 2 and got["err"].startswith("mmfuse export: error: ") and got["loaded"] == [], got


def test_the_docs_example_runs(exported: dict[str, Any], run: Path, tmp_path: Path):
    """docs/export.md's onnxruntime example (PIL + numpy + the tokenizer, no mmfuse) gives PyTorch's logits."""
    if exported["format"] != "onnx":
        pytest.skip("ONNX only")
    from PIL import Image

    from mmfuse.runs import load_run

    doc = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    image = tmp_path / "tall.png"  # not square: the crop matters
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 23, 3), dtype=np.uint8)).save(image)
    setup = f"EXPORT, IMAGE, TEXT = {str(exported['out'])!r}, {str(image)!r}, {TEXTS[1]!r}"
    code = "\n".join(setup if line.startswith("EXPORT, IMAGE, TEXT =") else line for line in code.splitlines())
    scope: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, "docs/export.md", "exec"), scope)
    model = load_run(run)
    img, txt = model.encoders["image"], model.encoders["text"]
    inputs = {"image": img.collate([img.preprocess(img.load(str(image)))]), "text": txt.collate([TEXTS[1]])}
    with torch.inference_mode():
        want = model(inputs).logits
    for out, got in zip(exported["info"]["outputs"], scope["logits"], strict=True):
        assert np.abs(got - want[out["name"]].numpy()).max() <= 1e-4, out["name"]
    assert printed.getvalue().splitlines()[0].startswith("color ")


def test_a_table_and_vector_run_exports_with_its_fitted_statistics(tmp_path: Path):
    """Modalities beyond image and text: a tabular encoder (a transformer layer over column tokens) and a vector."""
    rows = [
        {"age": 20.0 + 3 * i if i % 5 else None, "city": "abc"[i % 3], "vec": [i / 10, 1.0, -1.0], "label": "xy"[i % 2]}
        for i in range(16)
    ]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = {"name": "tabular", "numeric": ["age"], "categorical": ["city"], "dim": 8, "heads": 2}
    config = {
        "name": "table",
        "model": {
            "encoders": {"table": table, "vec": {"name": "embedding", "dim": 3}},
            "fusion": {"name": "concat", "output_dim": 4},
        },
        "tasks": {"label": {"kind": "multiclass"}},
        "data": {"source": "records", "path": str(tmp_path / "records.jsonl"), "val_fraction": 0.25},
    }
    run = make_run(tmp_path / "run", config)
    code, stdout, stderr = cli("export", str(run), "--out", str(tmp_path / "out"))
    assert code == 0, stderr
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    inputs = {i["name"]: i for i in info["inputs"]}
    assert inputs["table.numeric"]["shape"] == ["batch", 1] and inputs["table.categorical"]["dtype"] == "int64"
    assert inputs["table.numeric_present"]["dtype"] == "bool" and inputs["vec"]["shape"] == ["batch", 3]
    pre = info["preprocessing"]["table"]
    assert pre["categories"] == {"city": ["a", "b", "c"]} and set(pre["stats"]["age"]) == {"mean", "std"}
    assert info["preprocessing"]["vec"]["dim"] == 3
    assert info["check"]["passed"] and info["check"]["records"] != info["check"]["traced_records"]
