"""Tests for `mmfuse.fusion.bilinear`.

Shapes: B = 3 samples, H pooled size, k factor; image 12-d, text 10-d, fused size 8.
"""

from __future__ import annotations

import pytest
import torch

from mmfuse.fusion.bilinear import BilinearFusion
from mmfuse.fusion.concat import ConcatFusion


def projected(features, w, m: str) -> torch.Tensor:
    return features[m].pooled @ w[f"proj.{m}.weight"].T + w[f"proj.{m}.bias"]


def mfb_by_hand(a: torch.Tensor, b: torch.Tensor, hidden: int, k: int) -> torch.Tensor:
    """Sum pooling over each run of k entries, then sign-sqrt and L2 normalisation, one entry at a time."""
    z = torch.zeros(a.shape[0], hidden)
    for h in range(hidden):
        for j in range(k):
            z[:, h] += a[:, h * k + j] * b[:, h * k + j]
    z = torch.sign(z) * torch.sqrt(torch.abs(z))
    return z / z.norm(dim=1, keepdim=True)


def test_golden_value_mlb(dims, out_dim, features, fixed_init) -> None:
    fusion = BilinearFusion(dims, out_dim, variant="mlb", hidden_dim=6)
    w = fixed_init(fusion)
    assert w["proj.image.weight"].shape == (6, 12)
    z = torch.tanh(projected(features, w, "image")) * torch.tanh(projected(features, w, "text"))
    out = fusion(features)
    torch.testing.assert_close(out.fused, z @ w["fc_out.weight"].T + w["fc_out.bias"])
    torch.testing.assert_close(out.extras["pooled"], z)


@pytest.mark.parametrize(("hidden", "k"), [(8, 5), (4, 3), (6, 1)])
def test_golden_value_mfb(hidden, k, dims, out_dim, features, fixed_init) -> None:
    fusion = BilinearFusion(dims, out_dim, hidden_dim=hidden, factor=k)
    w = fixed_init(fusion)
    assert w["proj.text.weight"].shape == (hidden * k, 10)
    z = mfb_by_hand(projected(features, w, "image"), projected(features, w, "text"), hidden, k)
    out = fusion(features)
    torch.testing.assert_close(out.extras["pooled"], z)
    torch.testing.assert_close(out.fused, z @ w["fc_out.weight"].T + w["fc_out.bias"])


def test_mfb_entries_are_rank_k_bilinear_forms_of_the_inputs(dims, out_dim, features) -> None:
    hidden, k = 4, 3
    fusion = BilinearFusion(dims, out_dim, hidden_dim=hidden, factor=k)
    # With x~ = [x, 1]: (U x + c)_i = u~_i . x~, so entry h is x~^T W_h y~ with W_h = sum_j u~_{hk+j} v~_{hk+j}^T.
    u = torch.cat([fusion.proj["image"].weight, fusion.proj["image"].bias[:, None]], dim=1)  # (H * k, 13)
    v = torch.cat([fusion.proj["text"].weight, fusion.proj["text"].bias[:, None]], dim=1)  # (H * k, 11)
    w_h = torch.einsum("hja,hjb->hab", u.view(hidden, k, -1), v.view(hidden, k, -1))  # (H, 13, 11)
    assert torch.linalg.matrix_rank(w_h[0]).item() == k
    x = torch.cat([features["image"].pooled, torch.ones(3, 1)], dim=1)
    y = torch.cat([features["text"].pooled, torch.ones(3, 1)], dim=1)
    z = torch.einsum("na,hab,nb->nh", x, w_h, y)  # (B, H)
    z = torch.sign(z) * torch.sqrt(torch.abs(z))
    torch.testing.assert_close(fusion(features).extras["pooled"], z / z.norm(dim=1, keepdim=True))


def test_mfb_output_is_unit_norm_and_three_modalities_multiply(out_dim, feature_factory, fixed_init) -> None:
    dims = {"image": 12, "text": 10, "audio": 6}
    features = feature_factory(dims)
    mfb = BilinearFusion(dims, out_dim, hidden_dim=5, factor=2)
    torch.testing.assert_close(mfb(features).extras["pooled"].norm(dim=1), torch.ones(3))
    mlb = BilinearFusion(dims, out_dim, variant="mlb")
    w = fixed_init(mlb)
    z = torch.tanh(projected(features, w, "image")) * torch.tanh(projected(features, w, "text"))
    z = z * torch.tanh(projected(features, w, "audio"))
    torch.testing.assert_close(mlb(features).fused, z @ w["fc_out.weight"].T + w["fc_out.bias"])


@pytest.mark.parametrize("variant", ["mlb", "mfb"])
def test_learns_a_multiplicative_interaction_that_concat_cannot(variant, dims, interaction_accuracy) -> None:
    assert interaction_accuracy(BilinearFusion(dims, 2, variant=variant, hidden_dim=16)) > 0.85
    assert interaction_accuracy(ConcatFusion(dims, 2)) < 0.65


@pytest.mark.parametrize(
    ("dims", "kwargs", "match"),
    [
        ({"image": 12}, {}, "two or more modalities"),
        ({"image": 12, "text": 10}, {"variant": "mcb"}, "'mlb' or 'mfb'"),
        ({"image": 12, "text": 10}, {"variant": "mlb", "factor": 2}, "mfb' only"),
        ({"image": 12, "text": 10}, {"factor": 0}, "factor must be >= 1"),
    ],
)
def test_bad_options_raise(dims, kwargs, match, out_dim) -> None:
    with pytest.raises(ValueError, match=match):
        BilinearFusion(dims, out_dim, **kwargs)
