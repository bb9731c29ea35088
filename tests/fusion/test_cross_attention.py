"""Tests for `mmfuse.fusion.cross_attention`.

Shapes: B = 3 samples, H heads, Q queries, T key tokens; text tokens are padded ([5, 3, 1] real of 5).
"""

from __future__ import annotations

import math

import pytest
import torch

from mmfuse.builders import build_fusion
from mmfuse.config import Component, ConfigError
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


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis by its definition (biased variance, eps 1e-5)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def sincos(p: float, dim: int) -> list[float]:
    """`[sin(p f_0), .., sin(p f_{dim/2-1}), cos(p f_0), ..]` with `f_i = 10000^(-2i/dim)`, one scalar at a time."""
    freqs = [10000.0 ** (-2 * i / dim) for i in range(dim // 2)]
    return [math.sin(p * f) for f in freqs] + [math.cos(p * f) for f in freqs]


def position(modality: str, t: int, n: int, dim: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The encoding (dim,) of token t of n: image tokens on their row-major grid (square unless given), text 1-D."""
    if modality != "image":
        return torch.tensor(sincos(t, dim))
    w = grid[1] if grid else math.isqrt(n)
    return torch.tensor(sincos(t // w, dim // 2) + sincos(t % w, dim // 2))


def reference(
    features,
    w,
    direction: str,
    query: str,
    heads: int,
    residual: bool,
    norm: bool = True,
    positional: bool = True,
    grid: tuple[int, int] | None = None,
    readout: str = "mean",
) -> torch.Tensor:
    """The fusion by hand, one sample, query and head at a time; padding never enters. `readout="query"`: the
    learned queries attend over the per-query outputs, one head at a time, and `readout_proj` maps their results."""
    q_side, k_side = direction.split("_to_")
    d_out = w["out_proj.weight"].shape[0]
    d_h = d_out // heads

    def normed(x: torch.Tensor, side: str) -> torch.Tensor:
        return layer_norm(x, w[f"norm_{side}.weight"], w[f"norm_{side}.bias"]) if norm else x

    def pos(modality: str, count: int) -> torch.Tensor:  # (count, D_out) positions of the first `count` tokens
        n = features[modality].tokens.shape[1]
        rows = [position(modality, t, n, d_out, grid) if positional else torch.zeros(d_out) for t in range(count)]
        return torch.stack(rows)

    fused = []
    for b in range(3):
        keys = normed(real_tokens(features[k_side], b), "k")
        k = keys @ w["k_proj.weight"].T + w["k_proj.bias"] + pos(k_side, len(keys))  # (T_b, D_out)
        v = keys @ w["v_proj.weight"].T + w["v_proj.bias"] + pos(k_side, len(keys))
        if query == "pooled":
            qs = normed(features[q_side].pooled[b : b + 1], "q") @ w["q_proj.weight"].T + w["q_proj.bias"]
        else:
            tokens = real_tokens(features[q_side], b)
            qs = normed(tokens, "q") @ w["q_proj.weight"].T + w["q_proj.bias"] + pos(q_side, len(tokens))
        per_query = []
        for q in qs:
            attended = []
            for h in range(heads):
                s = slice(h * d_h, (h + 1) * d_h)
                weights = torch.softmax(k[:, s] @ q[s] / math.sqrt(d_h), dim=0)  # (T_b,)
                attended.append(weights @ v[:, s])
            per_query.append(torch.cat(attended) @ w["out_proj.weight"].T + w["out_proj.bias"])
        out = torch.stack(per_query).mean(dim=0) if readout == "mean" else read(torch.stack(per_query), w, heads)
        if residual:
            out = out + normed(features[q_side].pooled[b], "q") @ w["q_res.weight"].T + w["q_res.bias"]
        fused.append(out)
    return torch.stack(fused)


def read(outputs: torch.Tensor, w: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """The query read-out of (Q_b, D_out) real per-query outputs -> (D_out,)."""
    d_out = outputs.shape[1]
    d_h = d_out // heads

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[f"readout_pool.attn.{name}.weight"].T + w[f"readout_pool.attn.{name}.bias"]

    results = []
    for s in w["readout_pool.queries"]:  # each learned query (D_out,)
        q, k, v = lin(s, "q"), lin(outputs, "k"), lin(outputs, "v")
        heads_out = []
        for h in range(heads):
            c = slice(h * d_h, (h + 1) * d_h)
            heads_out.append(torch.softmax(k[:, c] @ q[c] / math.sqrt(d_h), dim=0) @ v[:, c])
        results.append(lin(torch.cat(heads_out), "out"))
    return torch.cat(results) @ w["readout_proj.weight"].T + w["readout_proj.bias"]


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize(("direction", "query"), CONFIGS)
def test_golden_value(direction, query, return_weights, dims, out_dim, features, fixed_init) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, direction=direction, query=query, return_weights=return_weights)
    w = fixed_init(fusion)
    expected = reference(features, w, direction, query, heads=4, residual=True)
    torch.testing.assert_close(fusion(features).fused, expected)


@pytest.mark.parametrize(("direction", "query"), CONFIGS)
def test_golden_value_without_norm_and_positions(direction, query, dims, out_dim, features, fixed_init) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, direction=direction, query=query, norm=False, positional=False)
    w = fixed_init(fusion)
    assert fusion.norm_q is None and not any(name.startswith("norm") for name in w)
    expected = reference(features, w, direction, query, heads=4, residual=True, norm=False, positional=False)
    torch.testing.assert_close(fusion(features).fused, expected)


def test_golden_value_without_residual_and_two_heads(dims, out_dim, features, fixed_init) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, num_heads=2, residual=False)
    w = fixed_init(fusion)
    assert fusion.q_res is None and "q_res.weight" not in w
    expected = reference(features, w, "image_to_text", "pooled", heads=2, residual=False)
    torch.testing.assert_close(fusion(features).fused, expected)


@pytest.mark.parametrize("query", ["pooled", "tokens"])
def test_golden_value_with_a_given_grid(query, dims, out_dim, features, fixed_init) -> None:
    # The 4 image tokens as a 1 x 4 strip, not the default 2 x 2 square.
    fusion = CrossAttentionFusion(dims, out_dim, direction="text_to_image", query=query, grid=(1, 4))
    w = fixed_init(fusion)
    expected = reference(features, w, "text_to_image", query, heads=4, residual=True, grid=(1, 4))
    torch.testing.assert_close(fusion(features).fused, expected)
    square = CrossAttentionFusion(dims, out_dim, direction="text_to_image", query=query)
    square.load_state_dict(fusion.state_dict())
    assert not torch.allclose(square(features).fused, fusion(features).fused)


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
    token = layer_norm(features["text"].tokens[2, 0], fusion.norm_k.weight, fusion.norm_k.bias)
    first_position = torch.tensor([0.0] * (out_dim // 2) + [1.0] * (out_dim // 2))  # sin 0, cos 0
    torch.testing.assert_close(attended[2, 0], token @ fusion.v_proj.weight.T + fusion.v_proj.bias + first_position)


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
        ({"image": 12, "text": 10}, {"spatial": "audio"}, "spatial='audio'"),
        ({"image": 12, "text": 10}, {"positional": False, "grid": (2, 2)}, "grid acts only"),
        ({"image": 12, "text": 10}, {"spatial": None, "grid": (2, 2)}, "grid acts only"),
    ],
)
def test_bad_options_raise(dims, kwargs, match, out_dim) -> None:
    with pytest.raises(ValueError, match=match):
        CrossAttentionFusion(dims, out_dim, **kwargs)


def test_positions_need_a_divisible_output_dim(dims) -> None:
    with pytest.raises(ValueError, match=r"output_dim \(6\) divisible by 4"):
        CrossAttentionFusion(dims, 6, num_heads=2)
    CrossAttentionFusion(dims, 6, num_heads=2, spatial=None)  # 1-D positions need an even size only
    CrossAttentionFusion(dims, 6, num_heads=2, positional=False)


def test_a_grid_that_does_not_hold_the_tokens_is_named(dims, out_dim, features) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, direction="text_to_image", grid=(3, 2))
    with pytest.raises(ValueError, match=r"image input has 4 tokens, but grid 3 x 2 holds 6"):
        fusion(features)


def scaled_key(features: dict[str, EncoderOutput], b: int, t: int, scale: float) -> dict[str, EncoderOutput]:
    """The features with sample b's image token t multiplied by `scale`."""
    image = features["image"]
    tokens = image.tokens.clone()
    tokens[b, t] *= scale
    return dict(features, image=EncoderOutput(image.pooled, tokens, image.mask, image.present))


@pytest.mark.parametrize("query", ["pooled", "tokens"])
def test_pre_norm_makes_the_output_invariant_to_a_key_tokens_scale(query, dims, out_dim, features) -> None:
    normed = CrossAttentionFusion(dims, out_dim, direction="text_to_image", query=query)
    plain = CrossAttentionFusion(dims, out_dim, direction="text_to_image", query=query, norm=False)
    louder = scaled_key(features, b=1, t=2, scale=50.0)
    torch.testing.assert_close(normed(louder).fused, normed(features).fused, atol=1e-4, rtol=1e-4)  # eps
    assert not torch.allclose(plain(louder).fused[1], plain(features).fused[1], atol=1e-3)
    assert torch.equal(plain(louder).fused[0], plain(features).fused[0])  # only sample 1 changed


def test_pre_norm_makes_the_output_invariant_to_the_querys_scale(dims, out_dim, features) -> None:
    normed = CrossAttentionFusion(dims, out_dim, direction="image_to_text")
    image = features["image"]
    louder = dict(features, image=EncoderOutput(10.0 * image.pooled, image.tokens, image.mask, image.present))
    torch.testing.assert_close(normed(louder).fused, normed(features).fused, atol=1e-4, rtol=1e-4)  # eps


def permuted_image(features: dict[str, EncoderOutput], order: list[int]) -> dict[str, EncoderOutput]:
    image = features["image"]
    return dict(features, image=EncoderOutput(image.pooled, image.tokens[:, order], image.mask, image.present))


@pytest.mark.parametrize("norm", [False, True])
def test_positions_let_a_pooled_query_tell_where_a_key_token_was(norm, dims, out_dim, features) -> None:
    order = [2, 0, 3, 1]
    with_pos = CrossAttentionFusion(dims, out_dim, direction="text_to_image", norm=norm)
    without = CrossAttentionFusion(dims, out_dim, direction="text_to_image", norm=norm, positional=False)
    # Without positions attention over the keys is a set operation: a permutation of the tokens changes nothing.
    torch.testing.assert_close(without(permuted_image(features, order)).fused, without(features).fused)
    assert not torch.allclose(with_pos(permuted_image(features, order)).fused, with_pos(features).fused, atol=1e-3)


def test_norm_layers_belong_to_their_modality(dims, out_dim) -> None:
    fusion = CrossAttentionFusion(dims, out_dim, direction="text_to_image")
    ids = {m: {id(p) for p in fusion.modality_parameters(m)} for m in fusion.modalities}
    assert {id(fusion.norm_q.weight), id(fusion.norm_q.bias), id(fusion.q_proj.weight)} <= ids["text"]
    assert {id(fusion.norm_k.weight), id(fusion.norm_k.bias), id(fusion.v_proj.weight)} <= ids["image"]
    plain = CrossAttentionFusion(dims, out_dim, direction="text_to_image", norm=False)
    assert len(plain.modality_parameters("image")) == len(fusion.modality_parameters("image")) - 2


def test_spatial_auto_is_the_image_when_there_is_one(dims, out_dim) -> None:
    assert CrossAttentionFusion(dims, out_dim).spatial == "image"
    assert CrossAttentionFusion({"q": 6, "table": 10}, 10, direction="q_to_table", num_heads=2).spatial is None
    assert CrossAttentionFusion(dims, out_dim, spatial=None).spatial is None
    assert CrossAttentionFusion(dims, out_dim, spatial="text").spatial == "text"


# ---------------------------------------------------------------------- read-outs
DIRECTIONS = ["image_to_text", "text_to_image"]


def xq(dims, out_dim, direction: str, num_queries: int = 1, **kwargs) -> CrossAttentionFusion:
    """cross_attention with token queries and the learned-query read-out."""
    return CrossAttentionFusion(
        dims, out_dim, direction=direction, query="tokens", readout="query", num_queries=num_queries, **kwargs
    )


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize("num_queries", [1, 2])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_query_readout_golden_value(direction, num_queries, return_weights, dims, out_dim, features, fixed_init):
    fusion = xq(dims, out_dim, direction, num_queries, num_heads=2, return_weights=return_weights)
    w = fixed_init(fusion)
    expected = reference(features, w, direction, "tokens", heads=2, residual=True, readout="query")
    torch.testing.assert_close(fusion(features).fused, expected)


def test_the_mean_readout_is_the_default_and_adds_no_parameter(dims, out_dim) -> None:
    default = CrossAttentionFusion(dims, out_dim, query="tokens")
    assert default.readout == "mean"
    assert (
        default.state_dict().keys()
        == CrossAttentionFusion(dims, out_dim, query="tokens", readout="mean").state_dict().keys()
    )
    assert not any(k.startswith("readout") for k in default.state_dict())


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_query_readout_shape_gradients_and_determinism(
    direction, dims, out_dim, features, gradients_and_determinism
) -> None:
    fusion = xq(dims, out_dim, direction, num_queries=2)
    for f in features.values():
        f.pooled.requires_grad_()
        f.tokens.requires_grad_()
    assert fusion(features).fused.shape == (3, out_dim)
    gradients_and_determinism(fusion, features)


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_query_readout_padding_values_change_nothing(direction, return_weights, dims, out_dim, features, new_padding):
    fusion = xq(dims, out_dim, direction, num_queries=2, return_weights=return_weights)
    before, after = fusion(features), fusion(new_padding(features))
    assert torch.equal(before.fused, after.fused)
    assert ("readout" in before.extras) == return_weights
    if return_weights:
        assert torch.equal(before.extras["readout"], after.extras["readout"])


def test_query_readout_weights_cover_the_real_queries_only(dims, out_dim, features) -> None:
    out = xq(dims, out_dim, "text_to_image", num_queries=3, return_weights=True)(features)
    weights = out.extras["readout"]  # (B, H, K, Q): over the 5 text queries, [5, 3, 1] real
    assert weights.shape == (3, 4, 3, 5)
    assert (weights.masked_select(~features["text"].mask[:, None, None, :]) == 0).all()
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3, 4, 3))
    assert torch.equal(weights[2, :, :, 0], torch.ones(4, 3))  # sample 2 has one real text query


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"readout": "max"}, r"^cross_attention readout must be one of 'mean', 'query'; got 'max'$"),
        ({"readout": "cls", "query": "tokens"}, r"^cross_attention readout='cls' is not offered: its queries never"),
        ({"readout": "query"}, r"^cross_attention readout='query' needs query='tokens'"),
        ({"readout": "mean", "num_queries": 2}, r"^cross_attention num_queries acts only with readout='query'"),
    ],
)
def test_bad_readout_options_are_one_line_naming_the_option(kwargs, match, dims, out_dim) -> None:
    with pytest.raises(ValueError, match=match):
        CrossAttentionFusion(dims, out_dim, **kwargs)
    option = "num_queries" if "num_queries" in kwargs else "readout"
    with pytest.raises(ConfigError, match=rf"^model\.fusion[.:].*{option}") as info:
        build_fusion(Component(name="cross_attention", output_dim=out_dim, **kwargs), dims)
    assert "\n" not in str(info.value)
