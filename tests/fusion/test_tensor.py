"""Tests for `mmfuse.fusion.tensor`.

Shapes: B = 3 samples, d projected size; image 12-d, text 10-d, audio 6-d, fused size 8.
"""

from __future__ import annotations

import pytest
import torch

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.tensor import TensorFusion


def augmented(features, w, m: str) -> torch.Tensor:
    """`[proj_m(x_m), 1]` by hand (B, d + 1)."""
    h = features[m].pooled @ w[f"proj.{m}.weight"].T + w[f"proj.{m}.bias"]
    return torch.cat([h, torch.ones(h.shape[0], 1)], dim=1)


def test_golden_value_two_modalities(dims, out_dim, features, fixed_init) -> None:
    fusion = TensorFusion(dims, out_dim, hidden_dim=3)
    w = fixed_init(fusion)
    assert w["fc_out.weight"].shape == (8, 16)
    zi, zt = augmented(features, w, "image"), augmented(features, w, "text")
    outer = torch.stack([torch.outer(zi[b], zt[b]).flatten() for b in range(3)])  # (B, 16)
    torch.testing.assert_close(fusion(features).fused, outer @ w["fc_out.weight"].T + w["fc_out.bias"])


def test_golden_value_three_modalities(out_dim, feature_factory, fixed_init) -> None:
    dims = {"image": 12, "text": 10, "audio": 6}
    features = feature_factory(dims)
    fusion = TensorFusion(dims, out_dim, hidden_dim=2)
    w = fixed_init(fusion)
    weight = w["fc_out.weight"].view(8, 3, 3, 3)  # (D_out, d + 1, d + 1, d + 1), modalities in input_dims order
    z = [augmented(features, w, m) for m in dims]
    expected = torch.einsum("oabc,na,nb,nc->no", weight, *z) + w["fc_out.bias"]
    torch.testing.assert_close(fusion(features).fused, expected)


def test_unimodal_terms_survive_when_the_other_modality_is_zero(dims, out_dim, features, fixed_init) -> None:
    fusion = TensorFusion(dims, out_dim, hidden_dim=3)
    w = fixed_init(fusion)
    with torch.no_grad():
        fusion.proj["text"].bias.zero_()
    text = features["text"]
    zeroed = dict(features, text=EncoderOutput(torch.zeros_like(text.pooled), text.tokens, text.mask))
    # h_text = 0: every bimodal entry vanishes; image's unimodal column (text index d, the appended 1) remains.
    unimodal_weight = w["fc_out.weight"].view(8, 4, 4)[:, :, 3]  # (D_out, d + 1)
    expected = augmented(features, w, "image") @ unimodal_weight.T + w["fc_out.bias"]
    out = fusion(zeroed).fused
    torch.testing.assert_close(out, expected)
    assert (out - w["fc_out.bias"]).abs().min() > 0 and not torch.allclose(out[0], out[1])


def test_affine_in_each_modality_but_not_jointly(dims, out_dim, features) -> None:
    fusion = TensorFusion(dims, out_dim, hidden_dim=4)
    other = {m: EncoderOutput(torch.randn_like(f.pooled)) for m, f in features.items()}

    def mix(a: float, **which: bool) -> dict[str, EncoderOutput]:
        return {
            m: EncoderOutput(a * features[m].pooled + (1 - a) * other[m].pooled if which[m] else features[m].pooled)
            for m in features
        }

    def f(x: dict[str, EncoderOutput]) -> torch.Tensor:
        return fusion(x).fused

    for m in ("image", "text"):
        flags = {"image": m == "image", "text": m == "text"}
        swapped = {k: (other[k] if flags[k] else features[k]) for k in features}
        torch.testing.assert_close(f(mix(0.3, **flags)), 0.3 * f(features) + 0.7 * f(swapped))
    both = mix(0.3, image=True, text=True)
    assert not torch.allclose(f(both), 0.3 * f(features) + 0.7 * f(other), atol=1e-3)  # the bimodal term


def test_learns_a_multiplicative_interaction(dims, interaction_accuracy) -> None:
    assert interaction_accuracy(TensorFusion(dims, 2, hidden_dim=4)) > 0.85


def test_one_modality_raises(out_dim) -> None:
    with pytest.raises(ValueError, match="tensor fuses two or more modalities"):
        TensorFusion({"image": 12}, out_dim)
