"""Tests for `mmfuse.fusion.cross_attention`.

Shapes: B = 3 samples, H heads, Q queries, T key tokens; text tokens are padded ([5, 3, 1] real of 5).
"""

from __future__ import annotations

import math

import pytest
import torch

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.cross_attention import CrossAttentionFusion

# (direction, query): image queries over text tokens and the reverse, with one pooled query or all tokens.
CONFIGS = [
    ("image_to_text", "pooled"),
    ("image_to_text", "tokens"),
    ("text_to_image", "pooled"),
    ("text_to_image", "tokens"),
]


def real_tokens(f: EncoderOutput, b: int) -> torch.Tensor:
    """Sample b's real tokens (N_b, D)."""
    return f.tokens[b] if f.mask is None else f.tokens[b][f.mask[b]]


def reference(features, w, direction: str, query: str, heads: int, residual: bool) -> torch.Tensor:
    """The fusion by hand, one sample, query and head at a time; padding never enters."""
    q_side, k_side = direction.split("_to_")
    d_h = w["out_proj.weight"].shape[0] // heads
    fused = []
    for b in range(3):
        keys = real_tokens(features[k_side], b)
        k = keys @ w["k_proj.weight"].T + w["k_proj.bias"]  # (T_b, D_out)
        v = keys @ w["v_proj.weight"].T + w["v_proj.bias"]
        qs = features[q_side].pooled[b : b + 1] if query == "pooled" else real_tokens(features[q_side], b)
        per_query = []
        for q in qs @ w["q_proj.weight"].T + w["q_proj.bias"]:
            attended = []
            for h in range(heads):
                s = slice(h * d_h, (h + 1) * d_h)
                weights = torch.softmax(k[:, s] @ q[s] / math.sqrt(d_h), dim=0)  # (T_b,)
                attended.append(weights @ v[:, s])
            per_query.append(torch.cat(attended) @ w["out_proj.weight"].T + w["out_proj.bias"])
        out = torch.stack(per_query).mean(dim=0)
        if residual:
            out = out + features[q_side].pooled[b] @ w["q_res.weight"].T + w["q_res.bias"]
        fused.append(out)
    return torch.stack(fused)


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize(("direction", "query"), CONFIGS)
def test_golden_value(direction, query, return_weights, dims, out_dim, features, fixed_init) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, direction=direction, query=query, return_weights=return_weights)
    w = fixed_init(fusion)
    expected = reference(features, w, direction, query, heads=4, residual=True)
    torch.testing.assert_close(fusion(features).fused, expected)


def test_golden_value_without_residual_and_two_heads(dims, out_dim, features, fixed_init) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, num_heads=2, residual=False)
    w = fixed_init(fusion)
    assert fusion.q_res is None and "q_res.weight" not in w
    expected = reference(features, w, "image_to_text", "pooled", heads=2, residual=False)
    torch.testing.assert_close(fusion(features).fused, expected)


@pytest.mark.parametrize(("direction", "query"), CONFIGS)
def test_sdpa_and_explicit_paths_agree(direction, query, dims, out_dim, features) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, direction=direction, query=query)
    sdpa, explicit = fusion(features), fusion(features, return_weights=True)
    assert "attention" not in sdpa.extras and "attention" in explicit.extras
    torch.testing.assert_close(sdpa.fused, explicit.fused)
    torch.testing.assert_close(sdpa.extras["attended"], explicit.extras["attended"])


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize(("direction", "query"), CONFIGS)
def test_padding_values_change_nothing(direction, query, return_weights, dims, out_dim, features, new_padding):
    fusion = CrossAttentionFusion(dims, out_dim, direction=direction, query=query, return_weights=return_weights)
    before, after = fusion(features), fusion(new_padding(features))
    assert torch.equal(before.fused, after.fused)
    for key, value in before.extras.items():
        assert torch.equal(value, after.extras[key]), key


@pytest.mark.parametrize("return_weights", [False, True])
def test_a_single_real_token_returns_its_value_projection(return_weights, dims, out_dim, features) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, return_weights=return_weights)
    attended = fusion(features).extras["attended"]  # (B, 1, D_out); sample 2 has one real text token
    token = features["text"].tokens[2, 0]
    torch.testing.assert_close(attended[2, 0], token @ fusion.v_proj.weight.T + fusion.v_proj.bias)


@pytest.mark.parametrize(("direction", "query"), CONFIGS)
def test_weights_sum_to_one_over_real_tokens_and_vanish_on_padding(direction, query, dims, out_dim, features):
    weights = CrossAttentionFusion(dims, out_dim, direction=direction, query=query, return_weights=True)(
        features
    ).extras["attention"]
    k_side = direction.split("_to_")[1]
    num_queries = 1 if query == "pooled" else features[direction.split("_to_")[0]].tokens.shape[1]
    assert weights.shape == (3, 4, num_queries, features[k_side].tokens.shape[1])
    key_mask = features[k_side].mask
    if key_mask is not None:
        assert (weights.masked_select(~key_mask[:, None, None, :]) == 0).all()
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(weights.shape[:-1]))


def test_forward_keyword_overrides_the_init_option(dims, out_dim, features) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, return_weights=True)
    assert "attention" in fusion(features).extras
    assert "attention" not in fusion(features, return_weights=False).extras


@pytest.mark.parametrize("return_weights", [False, True])
def test_no_real_key_gives_zeros_not_nan(return_weights, dims, out_dim, features) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, return_weights=return_weights)
    absent = torch.tensor([False, True, False])
    out = fusion(dict(features, text=features["text"].without(absent)))
    assert torch.isfinite(out.fused).all()
    assert torch.equal(out.extras["attended"][1], torch.zeros(1, out_dim))
    if return_weights:
        assert torch.equal(out.extras["attention"][1], torch.zeros(4, 1, 5))
    # Absence is also read from `present` alone, with the mask left as it was.
    text = features["text"]
    only_present = EncoderOutput(text.pooled, text.tokens, text.mask, present=~absent)
    assert torch.equal(fusion(dict(features, text=only_present)).extras["attended"][1], torch.zeros(1, out_dim))


def test_gradient_skips_padding_and_reaches_the_used_inputs(dims, out_dim, features) -> None:
    for f in features.values():
        f.pooled.requires_grad_()
        f.tokens.requires_grad_()
    out = CrossAttentionFusion(dims, out_dim)(features)  # image pooled query over text tokens
    (out.fused * torch.randn_like(out.fused)).sum().backward()
    text_mask = features["text"].mask
    grad = features["text"].tokens.grad.abs().sum(dim=-1)  # (B, T)
    assert (grad[text_mask] > 0).all() and (grad[~text_mask] == 0).all()
    assert features["image"].pooled.grad.abs().sum() > 0
    assert features["text"].pooled.grad is None and features["image"].tokens.grad is None


def test_query_padding_is_excluded_from_the_mean(dims, out_dim, features) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, direction="text_to_image", query="tokens", residual=False)
    out = fusion(features)
    per_query = out.extras["attended"] @ fusion.out_proj.weight.T + fusion.out_proj.bias  # (B, T_text, D_out)
    torch.testing.assert_close(out.fused[2], per_query[2, 0])  # sample 2 has one real text token


def test_num_heads_must_divide_output_dim(dims) -> None:
    with pytest.raises(ValueError, match=r"output_dim \(8\) must be divisible by num_heads \(3\)"):
        CrossAttentionFusion(dims, 8, num_heads=3)


def test_missing_key_tokens_name_the_modality(dims, out_dim, features) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, direction="text_to_image")
    with pytest.raises(ValueError, match="image"):
        fusion(dict(features, image=EncoderOutput(features["image"].pooled)))


@pytest.mark.parametrize(
    ("dims", "kwargs", "match"),
    [
        ({"image": 12, "text": 10}, {"direction": "image_to_audio"}, "direction"),
        ({"image": 12, "text": 10}, {"direction": "image_to_image"}, "direction"),
        ({"image": 12, "text": 10, "audio": 6}, {}, "exactly two modalities"),
        ({"image": 12, "text": 10}, {"query": "mean"}, "query"),
    ],
)
def test_bad_options_raise(dims, kwargs, match, out_dim) -> None:
    with pytest.raises(ValueError, match=match):
        CrossAttentionFusion(dims, out_dim, **kwargs)
