"""Tests for `mmfuse.encoders.embedding`: precomputed vectors through an optional projection.

Shapes: B = 3 vectors of E = 6 numbers, projected to D = 4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mmfuse.encoders.embedding import EmbeddingEncoder

E, D = 6, 4
VECTORS = [[0.5, -1.0, 2.0, 0.0, 3.25, -0.75], [1, 2, 3, 4, 5, 6], [0.0] * E]


def fixed_init_(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter from arange: ((arange(n) + 5 i) % 13 - 6) * 0.05."""
    values = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            n = math.prod(p.shape)
            values[name] = ((torch.arange(n, dtype=torch.float32) + 5 * i) % 13 - 6).reshape(p.shape) * 0.05
            p.copy_(values[name])
    return values


def run(encoder: EmbeddingEncoder, vectors=VECTORS):
    return encoder(encoder.collate([encoder.preprocess(v) for v in vectors]))


def test_identity_passes_vectors_through_unchanged() -> None:
    encoder = EmbeddingEncoder(dim=E)
    out = run(encoder)
    assert encoder.output_dim == E and not list(encoder.parameters())
    torch.testing.assert_close(out.pooled, torch.tensor(VECTORS, dtype=torch.float32), rtol=0, atol=0)
    assert out.tokens.shape == (3, 1, E) and torch.equal(out.tokens[:, 0], out.pooled)


def test_golden_projection_and_layer_norm() -> None:
    encoder = EmbeddingEncoder(dim=E, project=D, layer_norm=True)
    w = fixed_init_(encoder)
    x = np.array(VECTORS, dtype=np.float64)
    y = x @ w["proj.weight"].double().numpy().T + w["proj.bias"].double().numpy()
    y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
    y = y * w["norm.weight"].double().numpy() + w["norm.bias"].double().numpy()
    out = run(encoder)
    assert encoder.output_dim == D and out.pooled.shape == (3, D) and out.tokens.shape == (3, 1, D)
    torch.testing.assert_close(out.pooled, torch.tensor(y, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_layer_norm_without_projection() -> None:
    encoder = EmbeddingEncoder(dim=E, layer_norm=True)
    assert encoder.output_dim == E
    out = run(encoder, [VECTORS[1]])
    x = np.array(VECTORS[1], dtype=np.float64)
    expected = (x - x.mean()) / np.sqrt(x.var() + 1e-5)  # LayerNorm's initial weight 1, bias 0
    torch.testing.assert_close(out.pooled[0], torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_gradient_reaches_every_parameter(seed) -> None:
    encoder = EmbeddingEncoder(dim=E, project=D, layer_norm=True)
    run(encoder).pooled.pow(3).sum().backward()  # pow(3): LayerNorm's output sums to a constant otherwise
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_eval_twice_is_identical(seed) -> None:
    encoder = EmbeddingEncoder(dim=E, project=D).eval()
    batch = encoder.collate([encoder.preprocess(v) for v in VECTORS])
    with torch.no_grad():
        torch.testing.assert_close(encoder(batch).pooled, encoder(batch).pooled, rtol=0, atol=0)


def test_freeze(seed) -> None:
    encoder = EmbeddingEncoder(dim=E, project=D, freeze=True).train()
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_arrays_and_tensors_are_accepted() -> None:
    encoder = EmbeddingEncoder(dim=E)
    expected = encoder.preprocess(VECTORS[0])
    assert expected.dtype == torch.float32
    assert torch.equal(encoder.preprocess(np.array(VECTORS[0])), expected)
    assert torch.equal(encoder.preprocess(torch.tensor(VECTORS[0], dtype=torch.float64)), expected)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1.0] * (E - 1), r"expected a vector of 6 numbers, got shape \(5,\)"),
        ([1.0] * (E + 1), r"got shape \(7,\)"),
        (np.ones((2, 3)), r"got shape \(2, 3\)"),
        ([1.0, float("nan"), 0, 0, 0, 0], "vector element 1 is nan"),
        ([1.0, 0, 0, 0, 0, float("inf")], "vector element 5 is inf"),
        (["1", 2, 3, 4, 5, 6], "holding non-numbers"),
        ([True, 2, 3, 4, 5, 6], "holding non-numbers"),
        ("1 2 3 4 5 6", "got str"),
        (np.array(["a"] * E), "dtype <U1"),
    ],
)
def test_bad_vectors_are_refused_with_one_line(raw, message) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddingEncoder(dim=E).preprocess(raw)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, "must be positive"),
        ({"dim": E, "project": 0}, "must be positive"),
        ({"dim": E, "columns": ["a", "b"]}, "2 columns for vectors of dim 6"),
        ({"dim": E, "columns": list("abcdef"), "prefix": "e"}, "not both"),
    ],
)
def test_bad_options_raise(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddingEncoder(**kwargs)
