"""Every registered fusion can be exported: `torch.export` captures the tiny image (spatial tokens) + text model with
dynamic batch and sequence axes, and the captured graph equals the model on a batch of another size and text length.
(`mmfuse export` starts from this capture for both ONNX and TorchScript; tests/test_export.py writes both files.)"""

from __future__ import annotations

import pytest
import torch

from mmfuse.builders import build_model
from mmfuse.export.backends import capture
from mmfuse.export.spec import FlatModel, flat_inputs, input_specs
from mmfuse.fusion import FUSIONS
from tiny import tiny_model


def batch(model, texts: list[str]) -> dict:
    text = model.encoders["text"]
    return {"image": torch.randn(len(texts), 3, 32, 32), "text": text.collate([text.preprocess(t) for t in texts])}


@pytest.mark.parametrize("name", FUSIONS.names())
def test_every_fusion_is_captured_with_dynamic_axes(name: str, seed: int) -> None:
    config = {"model": tiny_model(name), "tasks": {"c": {"kind": "multiclass", "classes": ["a", "b", "c"]}}}
    config["model"]["encoders"]["image"]["tokens"] = True
    model = build_model(config).eval()
    traced = batch(model, ["a red square", "what colour is it"])
    specs = input_specs(model, traced, {"image": "x.png", "text": "a red square"})
    assert [s.shape for s in specs][1] == ("batch", "text_sequence")
    flat = FlatModel(model, specs).eval()
    with torch.no_grad():
        program = capture(flat, flat_inputs(specs, traced), specs)
        other = batch(model, ["red?", "is there a large blue square in the middle of this picture?", "x"])
        # without torch.export's runtime guards, as the ONNX file runs: relation guards on its chunk count (a Python
        # int from the batch size), which changes how many pair rows run at once, not the result
        (got,) = program.module(check_guards=False)(*flat_inputs(specs, other))
        want = model(other).logits["c"]
    assert got.shape == (3, 3)
    assert (got - want).abs().max() <= 1e-4
