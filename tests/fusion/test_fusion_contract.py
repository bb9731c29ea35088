"""Every registered fusion against the contract in `mmfuse.fusion.base`, with its default options.

A newly registered fusion is tested here the moment it is registered.
"""

from __future__ import annotations

import pytest
import torch

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion import FUSIONS, Fusion, FusionOutput
from mmfuse.registry import describe

NAMES = FUSIONS.names()


def build(name: str, dims: dict[str, int], out_dim: int) -> Fusion:
    return FUSIONS.get(name)(dims, out_dim)


def test_the_fusions_are_registered() -> None:
    expected = {"sum", "concat", "film", "gated", "cross_attention", "bilinear", "tensor", "lmf", "co_attention"}
    assert expected | {"relation", "spatial_film"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_type(name, dims, out_dim, features) -> None:
    fusion = build(name, dims, out_dim)
    out = fusion(features)
    assert isinstance(fusion, Fusion) and isinstance(out, FusionOutput)
    assert describe(type(fusion)), "the first docstring line is what `mmfuse list` shows"
    assert fusion.output_dim == out_dim
    assert out.fused.shape == (3, out_dim)
    assert torch.isfinite(out.fused).all()
    assert all(c.shape == (3, out_dim) for c in out.contributions.values())


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter_and_every_modality(name, dims, out_dim, features) -> None:
    fusion = build(name, dims, out_dim)
    for f in features.values():
        f.pooled.requires_grad_()
        f.tokens.requires_grad_()
    out = fusion(features)
    (out.fused * torch.randn_like(out.fused)).sum().backward()
    for pname, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
    for m, f in features.items():
        used = (f.pooled, f.tokens) if fusion.needs_tokens else (f.pooled,)
        assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in used), f"no gradient reaches {m}"


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic(name, dims, out_dim, features) -> None:
    fusion = build(name, dims, out_dim).eval()
    with torch.no_grad():
        assert torch.equal(fusion(features).fused, fusion(features).fused)


@pytest.mark.parametrize("name", NAMES)
def test_contributions_add_up_to_fused(name, dims, out_dim, features) -> None:
    out = build(name, dims, out_dim)(features)
    if not out.contributions:
        assert out.bias is None
        return
    assert list(out.contributions) == list(dims)
    total = sum(out.contributions.values()) + (0 if out.bias is None else out.bias)
    torch.testing.assert_close(total, out.fused)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("missing", ["image", "text"])
def test_missing_modality_gives_finite_output_and_leaves_other_samples_alone(
    name, missing, dims, out_dim, features
) -> None:
    fusion = build(name, dims, out_dim)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fusion.modules()):
        fusion.eval()  # batch statistics mix the samples of a training batch by design; running ones do not
    absent = torch.tensor([False, True, False])
    partial = dict(features, **{missing: features[missing].without(absent)})
    full_out, partial_out = fusion(features).fused, fusion(partial).fused
    assert torch.isfinite(partial_out).all()
    torch.testing.assert_close(partial_out[~absent], full_out[~absent])


@pytest.mark.parametrize("name", NAMES)
def test_works_without_tokens_unless_it_needs_them(name, dims, out_dim, features) -> None:
    fusion = build(name, dims, out_dim)
    pooled_only = {m: EncoderOutput(f.pooled) for m, f in features.items()}
    if fusion.needs_tokens:
        with pytest.raises(ValueError, match="tokens"):
            fusion(pooled_only)
        return
    torch.testing.assert_close(fusion(pooled_only).fused, fusion(features).fused, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("other_dims", [{"image": 12}, {"image": 12, "text": 10, "audio": 6}])
def test_other_modality_counts_work_or_raise_value_error(name, other_dims, out_dim, feature_factory) -> None:
    try:
        fusion = build(name, other_dims, out_dim)
    except ValueError as e:
        assert str(e), "the error must say what is wrong"
        return
    assert fusion(feature_factory(other_dims)).fused.shape == (3, out_dim)


@pytest.mark.parametrize("name", NAMES)
def test_follows_the_dtype_it_is_moved_to(name, dims, out_dim, features) -> None:
    fusion = build(name, dims, out_dim).double()
    doubled = {
        m: EncoderOutput(*(t.double() if t is not None and t.is_floating_point() else t for t in f.as_tuple()))
        for m, f in features.items()
    }
    assert fusion(doubled).fused.dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_padded_token_values_change_nothing(name, dims, out_dim, features, new_padding) -> None:
    fusion = build(name, dims, out_dim)
    assert torch.equal(fusion(features).fused, fusion(new_padding(features)).fused)
