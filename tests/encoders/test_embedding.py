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


# ---------------------------------------------------------------------- data side
@pytest.fixture
def root(tmp_path):
    from mmfuse.encoders.base import DataRoot

    return DataRoot(tmp_path)


def test_read_a_list_and_hash_its_values(root) -> None:
    encoder = EmbeddingEncoder(dim=E)
    ref = encoder.read({"clip": VECTORS[0]}, "clip", root)
    assert ref == tuple(VECTORS[0]) and encoder.check(ref) is None
    assert torch.equal(encoder.preprocess(encoder.load(ref)), torch.tensor(VECTORS[0]))
    assert encoder.content_hash(ref) != encoder.content_hash(encoder.read({"clip": VECTORS[1]}, "clip", root))
    assert encoder.read({"clip": None}, "clip", root) is None and encoder.read({}, "clip", root) is None
    assert encoder.fields("clip") == ["clip"] and encoder.has_tokens
    assert torch.equal(encoder.placeholder(), torch.zeros(E))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1.0] * 5, r"^field 'clip': expected a vector of 6 numbers, got shape \(5,\)$"),
        ([1.0, float("nan"), 0, 0, 0, 0], r"^field 'clip': vector element 1 is nan \(not finite\)$"),
        ({"a": 1}, r"^field 'clip': expected 6 numbers or a .npy path, got dict$"),
        ("vectors/0.txt", r"^field 'clip': 'vectors/0.txt' is not a .npy file"),
        ("../outside.npy", "outside the data folder"),
    ],
)
def test_bad_field_values_are_one_line(root, value, message) -> None:
    from mmfuse.encoders.base import InputError

    with pytest.raises(InputError, match=message):
        EmbeddingEncoder(dim=E).read({"clip": value}, "clip", root)


def test_npy_files_under_the_root(root, tmp_path) -> None:
    encoder = EmbeddingEncoder(dim=E)
    (tmp_path / "vecs").mkdir()
    np.save(tmp_path / "vecs/a.npy", np.array(VECTORS[0], dtype=np.float64))
    np.save(tmp_path / "vecs/copy.npy", np.array(VECTORS[0], dtype=np.float64))
    ref = encoder.read({"clip": "vecs/a.npy"}, "clip", root)
    assert ref == str(tmp_path / "vecs/a.npy") and encoder.check(ref) is None
    torch.testing.assert_close(encoder.preprocess(encoder.load(ref)), torch.tensor(VECTORS[0]), rtol=0, atol=0)
    copy = encoder.read({"clip": "vecs/copy.npy"}, "clip", root)
    assert encoder.content_hash(copy) == encoder.content_hash(ref)  # the file's content, not its name


class _Boom:
    """Unpickling this object would create a file: a `.npy` loader must never get that far."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_npy_files_are_refused_without_unpickling(root, tmp_path) -> None:
    encoder = EmbeddingEncoder(dim=E)
    marker = tmp_path / "unpickled"
    np.save(tmp_path / "obj.npy", np.array([_Boom(str(marker))] * E, dtype=object), allow_pickle=True)
    np.save(tmp_path / "short.npy", np.zeros(E - 1))
    np.save(tmp_path / "nan.npy", np.array([0, 0, np.nan, 0, 0, 0]))
    np.savez(tmp_path / "zip.npy", a=np.zeros(E))  # a zip archive, written as zip.npy.npz
    (tmp_path / "zip.npy.npz").rename(tmp_path / "zip2.npy")
    reasons = {
        name: encoder.check(encoder.read({"clip": name}, "clip", root))
        for name in ("obj.npy", "short.npy", "nan.npy", "zip2.npy", "absent.npy")
    }
    assert "not a readable .npy array" in reasons["obj.npy"] and not marker.exists()
    assert reasons["short.npy"].endswith("short.npy: expected a vector of 6 numbers, got shape (5,)")
    assert reasons["nan.npy"].endswith("vector element 2 is nan (not finite)")
    assert "not a readable .npy array" in reasons["zip2.npy"]
    assert reasons["absent.npy"].endswith("absent.npy: file not found")
    assert all("\n" not in r for r in reasons.values())


def test_csv_column_group_by_names_or_prefix(root) -> None:
    named = EmbeddingEncoder(dim=3, columns=["a", "b", "c"])
    assert named.fields("vec") == ["a", "b", "c"]
    assert named.read({"a": "0.5", "b": "-1", "c": "2e-1", "label": "x"}, "vec", root) == (0.5, -1.0, 0.2)
    assert named.read({"a": "", "b": " ", "c": ""}, "vec", root) is None
    # prefix: e0..e11 ordered by number (e10 after e9), other columns ignored
    prefixed = EmbeddingEncoder(dim=12, prefix="e")
    row = {f"e{i}": str(i) for i in reversed(range(12))} | {"extra": "9", "eye": "1"}
    assert prefixed.read(row, "vec", root) == tuple(float(i) for i in range(12))
    assert prefixed.fields("vec") == ["e0", "e1"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"a": "1", "b": "", "c": "3"}, r"^columns a..c: cell 'b' is empty"),
        ({"a": "1", "b": "two", "c": "3"}, r"^columns a..c: cell 'b' = 'two' is not a number$"),
        ({"a": "1", "b": "nan", "c": "3"}, r"^columns a..c: vector element 1 is nan"),
    ],
)
def test_bad_column_groups_are_one_line(root, row, message) -> None:
    from mmfuse.encoders.base import InputError

    with pytest.raises(InputError, match=message):
        EmbeddingEncoder(dim=3, columns=["a", "b", "c"]).read(row, "vec", root)


def test_prefix_group_of_the_wrong_size(root) -> None:
    from mmfuse.encoders.base import InputError

    with pytest.raises(InputError, match=r"^columns e0..e1: expected a vector of 3 numbers, got shape \(2,\)$"):
        EmbeddingEncoder(dim=3, prefix="e").read({"e0": "1", "e1": "2"}, "vec", root)
