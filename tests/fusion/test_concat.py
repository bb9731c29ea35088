"""Tests for `mmfuse.fusion.concat`."""

from __future__ import annotations

import torch

from mmfuse.fusion.concat import ConcatFusion


def test_golden_value(dims, out_dim, features, fixed_init) -> None:
    fusion = ConcatFusion(dims, out_dim)
    w = fixed_init(fusion)
    x, y = features["image"].pooled, features["text"].pooled
    weight, bias = w["fc_out.weight"], w["fc_out.bias"]  # (8, 22), (8,)
    expected = torch.cat([x, y], dim=1) @ weight.T + bias
    out = fusion(features)
    torch.testing.assert_close(out.fused, expected)
    torch.testing.assert_close(out.contributions["image"], x @ weight[:, :12].T)
    torch.testing.assert_close(out.contributions["text"], y @ weight[:, 12:].T)
    torch.testing.assert_close(out.bias, bias)


def test_contributions_plus_bias_equal_fused(dims, out_dim, features) -> None:
    out = ConcatFusion(dims, out_dim)(features)
    torch.testing.assert_close(out.contributions["image"] + out.contributions["text"] + out.bias, out.fused)


def test_concatenation_follows_input_dims_order(out_dim, features, fixed_init) -> None:
    fusion = ConcatFusion({"text": 10, "image": 12}, out_dim)
    weight = fixed_init(fusion)["fc_out.weight"]
    x, y = features["image"].pooled, features["text"].pooled
    out = fusion(features)
    assert list(out.contributions) == ["text", "image"]
    torch.testing.assert_close(out.contributions["text"], y @ weight[:, :10].T)
    torch.testing.assert_close(out.fused, torch.cat([y, x], dim=1) @ weight.T + fusion.fc_out.bias)


def test_three_modalities(out_dim, feature_factory) -> None:
    dims = {"image": 12, "text": 10, "audio": 6}
    out = ConcatFusion(dims, out_dim)(feature_factory(dims))
    assert out.fused.shape == (3, out_dim)
    torch.testing.assert_close(sum(out.contributions.values()) + out.bias, out.fused)
