"""Tests for `mmfuse.fusion.gated`."""

from __future__ import annotations

import pytest
import torch

from mmfuse.fusion.gated import GatedFusion


@pytest.mark.parametrize(("gate_on", "other"), [("image", "text"), ("text", "image")])
def test_golden_value_either_side_gates(gate_on, other, dims, out_dim, features, fixed_init) -> None:
    fusion = GatedFusion(dims, out_dim, gate_on=gate_on)
    w = fixed_init(fusion)
    gate = torch.sigmoid(features[gate_on].pooled @ w[f"fc.{gate_on}.weight"].T + w[f"fc.{gate_on}.bias"])
    value = features[other].pooled @ w[f"fc.{other}.weight"].T + w[f"fc.{other}.bias"]
    expected = (gate * value) @ w["fc_out.weight"].T + w["fc_out.bias"]
    out = fusion(features)
    torch.testing.assert_close(out.fused, expected)
    torch.testing.assert_close(out.extras["gate"], gate)


def test_the_gating_side_matters(dims, out_dim, features) -> None:
    image_gates = GatedFusion(dims, out_dim, gate_on="image")
    text_gates = GatedFusion(dims, out_dim, gate_on="text")
    text_gates.load_state_dict(image_gates.state_dict())
    assert not torch.allclose(image_gates(features).fused, text_gates(features).fused)


def test_hidden_dim_and_gate_range(dims, out_dim, features) -> None:
    out = GatedFusion(dims, out_dim, hidden_dim=5)(features)
    gate = out.extras["gate"]
    assert gate.shape == (3, 5) and out.fused.shape == (3, out_dim)
    assert ((gate > 0) & (gate < 1)).all()


@pytest.mark.parametrize(
    ("dims", "kwargs"),
    [({"image": 12, "text": 10}, {"gate_on": "audio"}), ({"image": 12}, {})],
)
def test_bad_modalities_raise(dims, kwargs, out_dim) -> None:
    with pytest.raises(ValueError, match="gated fuses exactly two modalities"):
        GatedFusion(dims, out_dim, **kwargs)
