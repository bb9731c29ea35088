"""Tests for `mmfuse.fusion.lmf`, against `mmfuse.fusion.tensor`.

Shapes: B = 3 samples, d projected size, r rank; image 12-d, text 10-d, audio 6-d, fused size 8.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.lmf import LowRankFusion
from mmfuse.fusion.tensor import TensorFusion

THREE = {"image": 12, "text": 10, "audio": 6}


def augmented(features, w, m: str) -> torch.Tensor:
    h = features[m].pooled @ w[f"proj.{m}.weight"].T + w[f"proj.{m}.bias"]
    return torch.cat([h, torch.ones(h.shape[0], 1)], dim=1)


def test_golden_value(dims, out_dim, features, fixed_init) -> None:
    fusion = LowRankFusion(dims, out_dim, hidden_dim=3, rank=2)
    w = fixed_init(fusion)
    assert w["factors.image"].shape == (2, 4, 8)
    zi, zt = augmented(features, w, "image"), augmented(features, w, "text")
    expected = w["bias"].expand(3, 8).clone()
    for r in range(2):
        expected += (zi @ w["factors.image"][r]) * (zt @ w["factors.text"][r])
    torch.testing.assert_close(fusion(features).fused, expected)


def full_rank_copy(tfn: TensorFusion) -> LowRankFusion:
    """An LMF equal to `tfn`: the exact CP decomposition of its weight tensor W (D_out, d+1, ..., d+1) at rank
    (d+1)^(M-1). Rank index r = (a_1, ..., a_{M-1}): factors_m[r] = e_{a_m} for m < M, factors_M[r][c] = W[:, r, c]."""
    names, d1, out = tfn.modalities, tfn.hidden_dim + 1, tfn.output_dim
    weight = tfn.fc_out.weight.detach().view(out, *[d1] * len(names))
    heads = list(itertools.product(range(d1), repeat=len(names) - 1))
    lmf = LowRankFusion(tfn.input_dims, out, hidden_dim=tfn.hidden_dim, rank=len(heads))
    lmf.proj.load_state_dict(tfn.proj.state_dict())
    with torch.no_grad():
        for m in names:
            lmf.factors[m].zero_()
        for r, index in enumerate(heads):
            for m, a in zip(names[:-1], index, strict=True):
                lmf.factors[m][r, a, :] = 1.0
            lmf.factors[names[-1]][r] = weight[(slice(None), *index)].T  # (d + 1, D_out)
        lmf.bias.copy_(tfn.fc_out.bias)
    return lmf


@pytest.mark.parametrize("three", [False, True])
def test_full_rank_lmf_reproduces_tensor_fusion(three, dims, out_dim, feature_factory) -> None:
    dims = THREE if three else dims
    features = feature_factory(dims)
    tfn = TensorFusion(dims, out_dim, hidden_dim=3)
    lmf = full_rank_copy(tfn)
    assert lmf.rank == (16 if three else 4)
    torch.testing.assert_close(lmf(features).fused, tfn(features).fused)


@pytest.mark.parametrize("three", [False, True])
def test_every_lmf_is_the_tensor_fusion_of_its_reconstructed_weight(three, dims, out_dim, feature_factory) -> None:
    dims = THREE if three else dims
    features = feature_factory(dims)
    lmf = LowRankFusion(dims, out_dim, hidden_dim=3, rank=2)
    tfn = TensorFusion(dims, out_dim, hidden_dim=3)
    tfn.proj.load_state_dict(lmf.proj.state_dict())
    letters = "abc"[: len(dims)]
    spec = ",".join(f"r{c}o" for c in letters) + f"->o{letters}"  # e.g. "rao,rbo->oab"
    weight = torch.einsum(spec, *[lmf.factors[m] for m in dims])  # sum_r prod_m factors_m[r, a_m, o]
    with torch.no_grad():
        tfn.fc_out.weight.copy_(weight.reshape(out_dim, -1))
        tfn.fc_out.bias.copy_(lmf.bias)
    torch.testing.assert_close(tfn(features).fused, lmf(features).fused)


@pytest.mark.parametrize("rank", [1, 16])
def test_initial_output_scale_does_not_grow_with_rank(rank, dims, seed) -> None:
    fusion = LowRankFusion(dims, 8, rank=rank)
    std = fusion({m: EncoderOutput(torch.randn(4096, d)) for m, d in dims.items()}).fused.std().item()
    assert 0.1 < std < 1.0


def test_learns_a_multiplicative_interaction(dims, interaction_accuracy) -> None:
    assert interaction_accuracy(LowRankFusion(dims, 2, hidden_dim=4, rank=4)) > 0.85


@pytest.mark.parametrize(
    ("dims", "kwargs", "match"),
    [({"image": 12}, {}, "two or more modalities"), ({"image": 12, "text": 10}, {"rank": 0}, "rank must be >= 1")],
)
def test_bad_options_raise(dims, kwargs, match, out_dim) -> None:
    with pytest.raises(ValueError, match=match):
        LowRankFusion(dims, out_dim, **kwargs)
