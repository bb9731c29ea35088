"""Tests for `mmfuse.fusion.film`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmfuse.fusion.film import FiLMFusion


def reference(cond: torch.Tensor, target: torch.Tensor, w: dict[str, torch.Tensor], hidden: int) -> torch.Tensor:
    """`fc_out(gamma * target + beta)` by hand; the target is projected when `w` holds a projection."""
    film = cond @ w["fc.weight"].T + w["fc.bias"]
    gamma, beta = film[:, :hidden], film[:, hidden:]
    if "target_proj.weight" in w:
        target = target @ w["target_proj.weight"].T + w["target_proj.bias"]
    return (gamma * target + beta) @ w["fc_out.weight"].T + w["fc_out.bias"]


def test_golden_value_text_conditions_image_of_another_size(dims, out_dim, features, fixed_init) -> None:
    fusion = FiLMFusion(dims, out_dim)  # text (10) conditions, image (12) projected to hidden = 8
    w = fixed_init(fusion)
    assert w["target_proj.weight"].shape == (8, 12)
    expected = reference(features["text"].pooled, features["image"].pooled, w, hidden=8)
    out = fusion(features)
    torch.testing.assert_close(out.fused, expected)
    assert out.extras["gamma"].shape == out.extras["beta"].shape == (3, 8)


def test_golden_value_image_conditions_with_hidden_dim(dims, out_dim, features, fixed_init) -> None:
    fusion = FiLMFusion(dims, out_dim, condition_on="image", hidden_dim=5)  # text (10) -> 5
    w = fixed_init(fusion)
    expected = reference(features["image"].pooled, features["text"].pooled, w, hidden=5)
    torch.testing.assert_close(fusion(features).fused, expected)


def test_target_of_the_hidden_size_is_not_projected(dims, out_dim, features, fixed_init) -> None:
    fusion = FiLMFusion(dims, out_dim, condition_on="image", hidden_dim=10)  # text is already 10-d
    assert isinstance(fusion.target_proj, nn.Identity)
    w = fixed_init(fusion)
    expected = reference(features["image"].pooled, features["text"].pooled, w, hidden=10)
    torch.testing.assert_close(fusion(features).fused, expected)


@pytest.mark.parametrize(
    ("dims", "kwargs"),
    [({"image": 12, "text": 10}, {"condition_on": "audio"}), ({"image": 12, "text": 10, "audio": 6}, {})],
)
def test_bad_modalities_raise(dims, kwargs, out_dim) -> None:
    with pytest.raises(ValueError, match="film fuses exactly two modalities"):
        FiLMFusion(dims, out_dim, **kwargs)
