"""Tests for `mmfuse.fusion.sum`."""

from __future__ import annotations

import torch

from mmfuse.fusion.sum import SumFusion


def test_golden_value(dims, out_dim, features, fixed_init) -> None:
    fusion = SumFusion(dims, out_dim)
    w = fixed_init(fusion)
    x, y = features["image"].pooled, features["text"].pooled
    image = x @ w["fc.image.weight"].T + w["fc.image.bias"]
    text = y @ w["fc.text.weight"].T + w["fc.text.bias"]
    out = fusion(features)
    torch.testing.assert_close(out.fused, image + text)
    torch.testing.assert_close(out.contributions["image"], image)
    torch.testing.assert_close(out.contributions["text"], text)
    assert out.bias is None


def test_contributions_sum_exactly_to_fused(dims, out_dim, features) -> None:
    out = SumFusion(dims, out_dim)(features)
    assert torch.equal(out.contributions["image"] + out.contributions["text"], out.fused)


def test_three_modalities(out_dim, feature_factory) -> None:
    dims = {"image": 12, "text": 10, "audio": 6}
    features = feature_factory(dims)
    out = SumFusion(dims, out_dim)(features)
    assert out.fused.shape == (3, out_dim)
    assert list(out.contributions) == list(dims)
    torch.testing.assert_close(sum(out.contributions.values()), out.fused)
