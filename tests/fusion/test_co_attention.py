"""Tests for `mmfuse.fusion.co_attention` and `mmfuse.fusion.positional`.

Shapes: B = 3 samples, L layers, H heads; image 12-d with 4 spatial tokens (a 2 x 2 grid), text 10-d with 5 tokens
of which [5, 3, 1] are real; d model size.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import nn

from mmfuse.builders import build_fusion
from mmfuse.cli import main
from mmfuse.config import Component, ConfigError
from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.co_attention import CoAttentionFusion
from mmfuse.fusion.film import FiLMFusion
from mmfuse.fusion.positional import sincos_1d, sincos_2d
from tiny import run_config, tiny_model, write_dataset


def layer_norm(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def attention(x: torch.Tensor, ctx: torch.Tensor, w: dict[str, torch.Tensor], name: str, heads: int) -> torch.Tensor:
    """(Q, d) over (T, d), one head at a time with an explicit softmax."""
    q, k, v = (linear(t, w, f"{name}.{p}") for t, p in ((x, "q"), (ctx, "k"), (ctx, "v")))
    d_h = q.shape[1] // heads
    out = []
    for h in range(heads):
        s = slice(h * d_h, (h + 1) * d_h)
        out.append(torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(d_h), dim=1) @ v[:, s])
    return linear(torch.cat(out, dim=1), w, f"{name}.out")


def pos_1d(n: int, d: int) -> torch.Tensor:
    """Position t: sin(t / 10000^(2i/d)) for i < d/2, then the cosines."""
    return torch.tensor(
        [
            [math.sin(t / 10000 ** (2 * i / d)) for i in range(d // 2)]
            + [math.cos(t / 10000 ** (2 * i / d)) for i in range(d // 2)]
            for t in range(n)
        ]
    )


def pos_2d(h: int, w: int, d: int) -> torch.Tensor:
    """Token i * w + j: the row i's 1-D encoding in the first d/2 channels, column j's in the last d/2."""
    rows, cols = pos_1d(h, d // 2), pos_1d(w, d // 2)
    return torch.stack([torch.cat([rows[i], cols[j]]) for i in range(h) for j in range(w)])


def reference(
    features, w, layers: int, heads: int, self_attention: bool, positional: bool, readout: str = "mean"
) -> torch.Tensor:
    """The fusion by hand, one sample at a time over its real tokens only (padding never enters). `readout="cls"`
    puts each stream's CLS (no position) in front and reads it; `"query"` lets the learned queries attend over the
    final stream and concatenates their results."""
    d = w["proj.image.weight"].shape[0]
    n = 1 if readout == "cls" else 0
    fused = []
    for b in range(3):
        x = {}
        for m, f in features.items():
            tokens = f.tokens[b] if f.mask is None else f.tokens[b][f.mask[b]]
            x[m] = linear(layer_norm(tokens, w, f"norm_in.{m}"), w, f"proj.{m}")
            if positional:
                x[m] = x[m] + (pos_2d(2, 2, d) if m == "image" else pos_1d(5, d)[: len(tokens)])
            if readout == "cls":
                x[m] = torch.cat([w[f"cls.{m}"].unsqueeze(0), x[m]])
        for layer in range(layers):
            normed = {m: layer_norm(x[m], w, f"layers.{layer}.{m}.norm") for m in x}
            new = {}
            for m, o in (("image", "text"), ("text", "image")):
                p = f"layers.{layer}.{m}"
                y = x[m] + attention(normed[m], normed[o][n:], w, f"{p}.cross", heads)  # the other's real tokens
                if self_attention:
                    h = layer_norm(y, w, f"{p}.norm_self")
                    y = y + attention(h, h, w, f"{p}.self_attn", heads)
                hidden = linear(layer_norm(y, w, f"{p}.norm_ffn"), w, f"{p}.ffn.0")
                y = y + linear(0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))), w, f"{p}.ffn.2")
                new[m] = y
            x = new
        pooled = []
        for m in ("image", "text"):
            z = layer_norm(x[m], w, f"norm_out.{m}")
            if readout == "mean":
                pooled.append(z.mean(dim=0))
            elif readout == "cls":
                pooled.append(z[0])
            else:
                q = w[f"readout_pool.{m}.queries"]  # (K, d)
                pooled.append(attention(q, z, w, f"readout_pool.{m}.attn", heads).flatten())
        fused.append(linear(torch.cat(pooled), w, "fc_out"))
    return torch.stack(fused)


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize(
    ("layers", "self_attention", "positional"), [(2, True, True), (1, False, True), (2, True, False)]
)
def test_golden_value(layers, self_attention, positional, return_weights, dims, out_dim, features, fixed_init) -> None:
    fusion = CoAttentionFusion(
        dims,
        out_dim,
        num_layers=layers,
        num_heads=2,
        ffn_dim=6,
        self_attention=self_attention,
        positional=positional,
        return_weights=return_weights,
    )
    w = fixed_init(fusion)
    expected = reference(features, w, layers, heads=2, self_attention=self_attention, positional=positional)
    torch.testing.assert_close(fusion(features).fused, expected)


def test_positional_encodings_match_the_formula() -> None:
    torch.testing.assert_close(sincos_1d(torch.arange(7), 6), pos_1d(7, 6))
    torch.testing.assert_close(sincos_2d(2, 3, 8), pos_2d(2, 3, 8))
    grid = sincos_2d(3, 3, 16).view(3, 3, 16)
    assert not torch.allclose(grid[:, 0], grid[:, 2]) and not torch.allclose(grid[0], grid[2])


def test_sdpa_and_explicit_paths_agree_and_weights_are_returned(dims, out_dim, features) -> None:
    fusion = CoAttentionFusion(dims, out_dim, num_layers=3)
    sdpa, explicit = fusion(features), fusion(features, return_weights=True)
    assert not sdpa.extras
    torch.testing.assert_close(sdpa.fused, explicit.fused)
    to_text, to_image = explicit.extras["attention_image_to_text"], explicit.extras["attention_text_to_image"]
    assert to_text.shape == (3, 3, 4, 4, 5) and to_image.shape == (3, 3, 4, 5, 4)  # (B, L, H, T_a, T_b)
    text_mask = features["text"].mask
    assert (to_text.masked_select(~text_mask[:, None, None, None, :]) == 0).all()
    torch.testing.assert_close(to_text.sum(dim=-1), torch.ones(3, 3, 4, 4))
    torch.testing.assert_close(to_image.sum(dim=-1), torch.ones(3, 3, 4, 5))


@pytest.mark.parametrize("return_weights", [False, True])
def test_padding_values_change_nothing(return_weights, dims, out_dim, features, new_padding) -> None:
    fusion = CoAttentionFusion(dims, out_dim, return_weights=return_weights)
    before, after = fusion(features), fusion(new_padding(features))
    assert torch.equal(before.fused, after.fused)
    if return_weights:
        assert torch.equal(before.extras["attention_image_to_text"], after.extras["attention_image_to_text"])
        # Padded text queries attend too, but their rows are never used: the real rows match.
        real = features["text"].mask  # (B, T_text)
        text_rows = before.extras["attention_text_to_image"].transpose(1, 3)[real]  # (real tokens, H, L, T_image)
        assert torch.equal(text_rows, after.extras["attention_text_to_image"].transpose(1, 3)[real])


def test_gradient_skips_padding(dims, out_dim, features) -> None:
    tokens = features["text"].tokens.requires_grad_()
    out = CoAttentionFusion(dims, out_dim)(features)
    (out.fused * torch.randn_like(out.fused)).sum().backward()
    grad = tokens.grad.abs().sum(dim=-1)  # (B, T)
    text_mask = features["text"].mask
    assert (grad[text_mask] > 0).all() and (grad[~text_mask] == 0).all()


def flipped(features: dict[str, EncoderOutput], h: int, w: int) -> dict[str, EncoderOutput]:
    """The image's h x w token grid mirrored left-right (row-major flattening)."""
    image = features["image"]
    tokens = image.tokens.unflatten(1, (h, w)).flip(2).flatten(1, 2)  # (B, h * w, D)
    return dict(features, image=EncoderOutput(image.pooled, tokens, image.mask))


@pytest.mark.parametrize(("h", "w"), [(3, 3), (2, 3)])
def test_positions_tell_a_mirrored_grid_apart_and_only_they_do(h, w, dims, out_dim, features) -> None:
    image = features["image"]
    features = dict(features, image=EncoderOutput(image.pooled, torch.randn(3, h * w, 12)))
    grid = None if h == w else (h, w)
    with_positions = CoAttentionFusion(dims, out_dim, grid=grid)
    without = CoAttentionFusion(dims, out_dim, positional=False)
    assert not torch.allclose(with_positions(features).fused, with_positions(flipped(features, h, w)).fused, atol=1e-3)
    torch.testing.assert_close(without(features).fused, without(flipped(features, h, w)).fused)


def test_text_order_matters_only_with_positions(dims, out_dim, features) -> None:
    text = features["text"]
    order = torch.tensor([0, 2, 1, 3, 4])  # swaps two real tokens of samples 0 and 1 (sample 2 has one real token)
    swapped = dict(features, text=EncoderOutput(text.pooled, text.tokens[:, order], text.mask))
    for positional in (True, False):
        fusion = CoAttentionFusion(dims, out_dim, positional=positional)
        before, after = fusion(features).fused, fusion(swapped).fused
        if positional:
            assert not torch.allclose(before[:2], after[:2], atol=1e-3)
        else:
            torch.testing.assert_close(before, after)


def test_an_absent_modality_zeroes_its_weights_and_stays_finite(dims, out_dim, features) -> None:
    absent = torch.tensor([False, True, False])
    out = CoAttentionFusion(dims, out_dim, return_weights=True)(dict(features, text=features["text"].without(absent)))
    assert torch.isfinite(out.fused).all()
    assert (out.extras["attention_image_to_text"][1] == 0).all()
    assert (out.extras["attention_text_to_image"][0] != 0).any()


@pytest.mark.parametrize(
    ("num_tokens", "kwargs", "match"),
    [
        (6, {}, "6 tokens, not a square grid; set the fusion option grid"),
        (6, {"grid": (2, 2)}, "6 tokens, but grid 2 x 2 holds 4"),
    ],
)
def test_grid_errors_name_the_fix(num_tokens, kwargs, match, dims, out_dim, features) -> None:
    image = features["image"]
    features = dict(features, image=EncoderOutput(image.pooled, torch.randn(3, num_tokens, 12)))
    with pytest.raises(ValueError, match=match):
        CoAttentionFusion(dims, out_dim, **kwargs)(features)
    CoAttentionFusion(dims, out_dim, grid=(2, 3))(features)  # stated grids need not be square
    CoAttentionFusion(dims, out_dim, positional=False)(features)  # no positions, no grid needed


def test_missing_tokens_name_the_modality(dims, out_dim, features) -> None:
    with pytest.raises(ValueError, match="co_attention needs text tokens"):
        CoAttentionFusion(dims, out_dim)(dict(features, text=EncoderOutput(features["text"].pooled)))


@pytest.mark.parametrize(
    ("dims", "kwargs", "match"),
    [
        ({"image": 12, "text": 10, "audio": 6}, {}, "exactly two modalities"),
        ({"image": 12, "text": 10}, {"spatial": "audio"}, "spatial='audio' is not one of"),
        ({"image": 12, "text": 10}, {"num_heads": 3}, r"hidden_dim \(8\) divisible by num_heads \(3\)"),
        ({"image": 12, "text": 10}, {"hidden_dim": 6, "num_heads": 2}, "divisible by 4"),
        ({"image": 12, "text": 10}, {"positional": False, "grid": (2, 2)}, "grid acts only with"),
        ({"image": 12, "text": 10}, {"num_layers": 0}, "num_layers >= 1"),
    ],
)
def test_bad_options_raise(dims, kwargs, match, out_dim) -> None:
    with pytest.raises(ValueError, match=match):
        CoAttentionFusion(dims, out_dim, **kwargs)


def corner_questions(n: int, g: torch.Generator) -> tuple[dict[str, EncoderOutput], torch.Tensor]:
    """A 3 x 3 grid of noise tokens (6-d) with one bright token in a random corner, and a two-token question (4-d):
    "is it left?" or "is it at the top?". The pooled image (the mean token) is the same for every corner."""
    corner = torch.randint(0, 4, (n,), generator=g)
    row, col = corner // 2 * 2, corner % 2 * 2
    image = 0.3 * torch.randn(n, 9, 6, generator=g)
    image[torch.arange(n), row * 3 + col, 0] += 3.0
    question = torch.randint(0, 2, (n,), generator=g)
    text = 0.05 * torch.randn(n, 2, 4, generator=g)
    text[torch.arange(n), 0, question] += 1.0
    text[:, 1, 3] += 1.0
    label = torch.where(question == 0, col == 0, row == 0).long()
    return {"image": EncoderOutput(image.mean(1), image), "text": EncoderOutput(text.mean(1), text)}, label


def corner_accuracy(fusion: nn.Module, steps: int = 100) -> float:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(fusion.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only waits, and stalls when the cores are busy
    try:
        for _ in range(steps):
            features, labels = corner_questions(128, g)
            opt.zero_grad()
            nn.functional.cross_entropy(fusion(features).fused, labels).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    features, labels = corner_questions(1000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (fusion.eval()(features).fused.argmax(dim=1) == labels).float().mean().item()


def test_learns_where_the_bright_token_is_which_pooled_features_cannot(seed) -> None:
    dims = {"image": 6, "text": 4}
    small = {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 32}
    assert corner_accuracy(CoAttentionFusion(dims, 2, **small)) > 0.9
    assert corner_accuracy(CoAttentionFusion(dims, 2, positional=False, **small)) < 0.65
    assert corner_accuracy(FiLMFusion(dims, 2, hidden_dim=16)) < 0.65


# ---------------------------------------------------------------------- read-outs
READOUTS = [("query", 1), ("query", 2), ("cls", 1)]


def co(dims, out_dim, readout: str, num_queries: int = 1, **kwargs) -> CoAttentionFusion:
    return CoAttentionFusion(dims, out_dim, readout=readout, num_queries=num_queries, **kwargs)


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize(("readout", "num_queries"), READOUTS)
@pytest.mark.parametrize(("layers", "self_attention"), [(2, True), (1, False)])
def test_readout_golden_value(
    readout, num_queries, layers, self_attention, return_weights, dims, out_dim, features, fixed_init
) -> None:
    fusion = co(
        dims,
        out_dim,
        readout,
        num_queries,
        num_layers=layers,
        num_heads=2,
        ffn_dim=6,
        self_attention=self_attention,
        return_weights=return_weights,
    )
    w = fixed_init(fusion)
    expected = reference(features, w, layers, heads=2, self_attention=self_attention, positional=True, readout=readout)
    torch.testing.assert_close(fusion(features).fused, expected)


def test_the_mean_readout_is_the_default_and_adds_no_parameter(dims, out_dim) -> None:
    default, mean = CoAttentionFusion(dims, out_dim), co(dims, out_dim, "mean")
    assert default.readout == "mean"
    assert default.state_dict().keys() == mean.state_dict().keys()
    assert not any(k.startswith(("cls", "readout")) for k in default.state_dict())


@pytest.mark.parametrize(("readout", "num_queries"), READOUTS)
def test_readout_shape_gradients_and_determinism(
    readout, num_queries, dims, out_dim, features, gradients_and_determinism
) -> None:
    fusion = co(dims, out_dim, readout, num_queries)
    for f in features.values():
        f.tokens.requires_grad_()
    assert fusion(features).fused.shape == (3, out_dim)
    gradients_and_determinism(fusion, features)


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize(("readout", "num_queries"), READOUTS)
def test_readout_padding_values_change_nothing(
    readout, num_queries, return_weights, dims, out_dim, features, new_padding
) -> None:
    fusion = co(dims, out_dim, readout, num_queries, return_weights=return_weights)
    before, after = fusion(features), fusion(new_padding(features))
    assert torch.equal(before.fused, after.fused)
    # (attention_text_to_image has rows for padded text queries too, never used: its real rows are checked above.)
    keys = {"attention_image_to_text", "readout_image", "readout_text"}
    keys |= {"readout_image_to_text", "readout_text_to_image"} if readout == "cls" else set()
    assert keys <= before.extras.keys() if return_weights else not before.extras
    for key in keys & before.extras.keys():
        assert torch.equal(before.extras[key], after.extras[key]), key


def test_query_readout_weights_pick_real_tokens_only(dims, out_dim, features) -> None:
    out = co(dims, out_dim, "query", 3, return_weights=True)(features)
    to_image, to_text = out.extras["readout_image"], out.extras["readout_text"]
    assert to_image.shape == (3, 4, 3, 4) and to_text.shape == (3, 4, 3, 5)  # (B, H, K, T_m)
    text_mask = features["text"].mask
    assert (to_text.masked_select(~text_mask[:, None, None, :]) == 0).all()
    torch.testing.assert_close(to_text.sum(dim=-1), torch.ones(3, 4, 3))
    torch.testing.assert_close(to_image.sum(dim=-1), torch.ones(3, 4, 3))


def test_cls_readout_weights_and_the_token_maps_keep_their_shape(dims, out_dim, features) -> None:
    out = co(dims, out_dim, "cls", num_layers=3, return_weights=True)(features)
    # The token-to-token maps are those of `mean` (the CLS rows apart), so `mmfuse explain` reads them alike.
    assert out.extras["attention_image_to_text"].shape == (3, 3, 4, 4, 5)
    assert out.extras["attention_text_to_image"].shape == (3, 3, 4, 5, 4)
    cls_self, cls_cross = out.extras["readout_text"], out.extras["readout_text_to_image"]
    assert cls_self.shape == (3, 3, 4, 1 + 5) and cls_cross.shape == (3, 3, 4, 4)  # (B, L, H, n + T)
    padded = ~features["text"].mask
    assert (cls_self[:, :, :, 1:].masked_select(padded[:, None, None, :]) == 0).all()
    assert (cls_self[:, :, :, 0] > 0).all()  # the CLS is a key of its own stream
    torch.testing.assert_close(cls_self.sum(dim=-1), torch.ones(3, 3, 4))
    torch.testing.assert_close(cls_cross.sum(dim=-1), torch.ones(3, 3, 4))
    # SDPA and the explicit path agree
    fusion = co(dims, out_dim, "cls", num_layers=3)
    torch.testing.assert_close(fusion(features).fused, fusion(features, return_weights=True).fused)


@pytest.mark.parametrize("readout", ["query", "cls"])
def test_readout_of_an_absent_modality_stays_finite(readout, dims, out_dim, features) -> None:
    absent = torch.tensor([False, True, False])
    fusion = co(dims, out_dim, readout, return_weights=True)
    out = fusion(dict(features, text=features["text"].without(absent)))
    assert torch.isfinite(out.fused).all()
    assert (out.extras["attention_image_to_text"][1] == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"readout": "max"}, r"^co_attention readout must be one of 'mean', 'query', 'cls'; got 'max'$"),
        ({"readout": "query", "num_queries": 0}, r"^co_attention num_queries must be an integer >= 1; got 0$"),
        ({"readout": "mean", "num_queries": 2}, r"^co_attention num_queries acts only with readout='query'"),
    ],
)
def test_bad_readout_options_are_one_line_naming_the_option(kwargs, match, dims, out_dim) -> None:
    with pytest.raises(ValueError, match=match):
        CoAttentionFusion(dims, out_dim, **kwargs)
    option = next(iter(kwargs.keys() - {"readout"}), "readout")  # the option named by the config's error
    with pytest.raises(ConfigError, match=rf"^model\.fusion[.:].*{option}") as info:
        build_fusion(Component(name="co_attention", output_dim=out_dim, **kwargs), dims)
    assert "\n" not in str(info.value)


def test_readout_through_the_cli(tmp_path, capsys) -> None:
    """`readout: cls` trains end to end from a config; an unknown read-out is one `error:` line and exit 2."""
    data = write_dataset(tmp_path / "data", n=16)
    cfg = run_config(data, max_epochs=1, cache_dir=str(tmp_path / "cache"))
    cfg["model"] = tiny_model("co_attention", hidden_dim=16, num_layers=1, readout="cls")
    cfg["model"]["encoders"]["image"].update(tokens=True, image_size=64)  # a 2 x 2 grid of resnet18 tokens
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cls.yaml"), "--out", str(tmp_path / "cls")]) == 0, capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "cls" / "config.yaml").read_text())["model"]["fusion"]["readout"] == "cls"
    capsys.readouterr()
    cfg["model"]["fusion"]["readout"] = "max"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        "mmfuse train: error: model.fusion: co_attention readout must be one of 'mean', 'query', 'cls'; got 'max'"
    ]
