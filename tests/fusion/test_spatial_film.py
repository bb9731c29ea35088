"""Tests for `mmfuse.fusion.spatial_film`.

Shapes: B = 3 samples; image 12-d with 4 spatial tokens (a 2 x 2 grid), text 10-d (its pooled vector conditions);
W the blocks' width, N blocks, K the classifier's channels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.spatial_film import SpatialFiLMFusion

SMALL = {"width": 4, "num_blocks": 2, "classifier_channels": 5}


def conv(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A 'same' convolution written out: out[o, y, x] = sum_{c, dy, dx} W[o, c, dy, dx] in[c, y + dy, x + dx] + b[o]."""
    weight, k = w[f"{name}.weight"], w[f"{name}.weight"].shape[-1]
    padded = F.pad(x, (k // 2,) * 4)
    h, wd = x.shape[-2:]
    out = sum(
        torch.einsum("oc,bcij->boij", weight[:, :, dy, dx], padded[..., dy : dy + h, dx : dx + wd])
        for dy in range(k)
        for dx in range(k)
    )
    return out + w[f"{name}.bias"][:, None, None]


def batch_norm(x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm without affine: per channel over the batch and the grid, biased variance."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def reference(features, w, num_blocks: int, width: int, pool: str = "max") -> torch.Tensor:
    image, q = features["image"], features["text"].pooled
    mask = torch.ones(3, 4, dtype=torch.bool) if image.mask is None else image.mask
    tokens = image.tokens * mask.unsqueeze(-1)
    fmap = tokens.transpose(1, 2).reshape(3, -1, 2, 2)  # row-major: token 2 i + j is cell (i, j)
    xy = torch.tensor([[[-1.0, 1], [-1, 1]], [[-1, -1], [1, 1]]]).expand(3, 2, 2, 2)  # x = column, y = row
    stem = {"stem.weight": torch.cat([w["stem.weight"], w["stem_xy.weight"]], dim=1), "stem.bias": w["stem.bias"]}
    x = conv(torch.cat([fmap, xy], 1), stem, "stem")  # one 1x1 conv over [map; xy]
    x = torch.relu(batch_norm(x) * w["stem_norm.weight"][:, None, None] + w["stem_norm.bias"][:, None, None])
    film = q @ w["film.weight"].T + w["film.bias"]  # (B, N * 2 * W): [dgamma_1, beta_1, dgamma_2, ...]
    for k in range(num_blocks):
        gamma = 1 + film[:, 2 * k * width : (2 * k + 1) * width, None, None]
        beta = film[:, (2 * k + 1) * width : (2 * k + 2) * width, None, None]
        p = torch.relu(conv(torch.cat([x, xy], 1), w, f"blocks.{k}.input_proj"))
        x = p + torch.relu(gamma * batch_norm(conv(p, w, f"blocks.{k}.conv")) + beta)
    logits = conv(torch.cat([x, xy], 1), w, "classifier").flatten(2)  # (B, K, 4)
    x = torch.relu(logits)
    pooled = torch.stack([x[b][:, mask[b]].max(dim=1).values for b in range(3)])
    if pool == "max_xy":  # each channel's softmax over the real cells, then the mean of their (x, y)
        cells = torch.tensor([[-1.0, -1], [1, -1], [-1, 1], [1, 1]])  # token 2 i + j: (x = column j, y = row i)
        where = [torch.softmax(logits[b][:, mask[b]], dim=1) @ cells[mask[b]] for b in range(3)]  # each (K, 2)
        pooled = torch.cat([pooled, torch.stack(where).flatten(1)], dim=1)
    return pooled @ w["fc.weight"].T + w["fc.bias"]


def masked_image(features: dict[str, EncoderOutput]) -> dict[str, EncoderOutput]:
    image = features["image"]
    mask = torch.tensor([[True] * 4, [True, False, True, True], [False, False, True, False]])
    return dict(features, image=EncoderOutput(image.pooled, image.tokens, mask))


@pytest.mark.parametrize("pool", ["max", "max_xy"])
@pytest.mark.parametrize("masked", [False, True])
def test_golden_value(masked, pool, dims, out_dim, features, fixed_init) -> None:
    fusion = SpatialFiLMFusion(dims, out_dim, pool=pool, **SMALL)
    w = fixed_init(fusion)
    feats = masked_image(features) if masked else features
    torch.testing.assert_close(fusion(feats).fused, reference(feats, w, 2, 4, pool))


def test_max_xy_reads_where_a_channel_fires(dims, out_dim, features) -> None:
    """A channel that fires on one cell only gives that cell's coordinates; moving the cell moves them."""
    fusion = SpatialFiLMFusion(dims, out_dim, pool="max_xy", **SMALL)
    seen = {}
    fusion.fc.register_forward_pre_hook(lambda _m, args: seen.update(pooled=args[0]))
    for xy in [(-1.0, -1.0), (1.0, 1.0), (1.0, -1.0)]:  # three corners of the 2 x 2 grid: cells 0, 3 and 1
        with torch.no_grad():  # channel 0 = 50 (x x_c + y y_c): largest, by far, at the corner (x_c, y_c)
            fusion.classifier.weight.zero_()
            fusion.classifier.bias.zero_()
            fusion.classifier.weight[0, -2] = 50.0 * xy[0]  # the x channel
            fusion.classifier.weight[0, -1] = 50.0 * xy[1]  # the y channel
        fusion(features)
        where = seen["pooled"][:, 5:].view(3, 5, 2)[:, 0]  # (B, 2): channel 0's (x, y)
        torch.testing.assert_close(where, torch.tensor([xy] * 3), atol=1e-6, rtol=0)


def test_max_xy_of_a_sample_without_image_is_zero_and_finite(dims, out_dim, features) -> None:
    fusion = SpatialFiLMFusion(dims, out_dim, pool="max_xy", **SMALL)
    image = features["image"]
    absent = EncoderOutput(image.pooled, image.tokens, torch.tensor([[True] * 4, [False] * 4, [True] * 4]))
    out = fusion(dict(features, image=absent)).fused
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters() if p.grad is not None)


def test_gamma_and_beta_come_from_the_question(dims, out_dim, features) -> None:
    fusion = SpatialFiLMFusion(dims, out_dim, **SMALL)
    extras = fusion(features).extras
    film = fusion.film(features["text"].pooled).view(3, 2, 2, 4)
    torch.testing.assert_close(extras["gamma"], 1 + film[:, :, 0].flatten(1))
    torch.testing.assert_close(extras["beta"], film[:, :, 1].flatten(1))
    assert (fusion.condition_on, fusion.target) == ("text", "image")


def test_padded_cells_change_nothing(dims, out_dim, features) -> None:
    fusion = SpatialFiLMFusion(dims, out_dim, **SMALL)
    feats = masked_image(features)
    image = feats["image"]
    noisy = torch.where(image.mask.unsqueeze(-1), image.tokens, 100 * torch.randn_like(image.tokens))
    torch.testing.assert_close(
        fusion(feats).fused, fusion(dict(feats, image=EncoderOutput(image.pooled, noisy, image.mask))).fused
    )


def test_a_mirrored_grid_gives_another_output(dims, out_dim, features) -> None:
    fusion = SpatialFiLMFusion(dims, out_dim, **SMALL).eval()
    image = features["image"]
    mirrored = image.tokens.unflatten(1, (2, 2)).flip(2).flatten(1, 2)
    out = fusion(dict(features, image=EncoderOutput(image.pooled, mirrored)))
    assert not torch.allclose(out.fused, fusion(features).fused, atol=1e-4)


def test_a_non_square_grid_needs_the_grid_option(dims, out_dim, features) -> None:
    six = dict(features, image=EncoderOutput(features["image"].pooled, torch.randn(3, 6, 12)))
    with pytest.raises(ValueError, match="6 tokens, not a square grid; set the fusion option grid: \\[h, w\\]"):
        SpatialFiLMFusion(dims, out_dim, **SMALL)(six)
    with pytest.raises(ValueError, match="6 tokens, but grid 2 x 2 holds 4"):
        SpatialFiLMFusion(dims, out_dim, grid=(2, 2), **SMALL)(six)
    assert SpatialFiLMFusion(dims, out_dim, grid=(2, 3), **SMALL)(six).fused.shape == (3, out_dim)


def test_missing_tokens_name_the_modality(dims, out_dim, features) -> None:
    with pytest.raises(ValueError, match="spatial_film needs image tokens"):
        SpatialFiLMFusion(dims, out_dim)(dict(features, image=EncoderOutput(features["image"].pooled)))


@pytest.mark.parametrize(
    ("dims", "kwargs", "match"),
    [
        ({"image": 12, "text": 10, "audio": 6}, {}, "exactly two modalities"),
        ({"image": 12, "text": 10}, {"spatial": "audio"}, "set spatial to one of"),
        ({"image": 12, "text": 10}, {"num_blocks": 0}, "must be >= 1"),
        ({"image": 12, "text": 10}, {"pool": "mean"}, "spatial_film pool must be one of max, max_xy; got 'mean'"),
    ],
)
def test_bad_options_raise(dims, kwargs, match, out_dim) -> None:
    with pytest.raises(ValueError, match=match):
        SpatialFiLMFusion(dims, out_dim, **kwargs)


def test_modality_parameters(dims, out_dim) -> None:
    fusion = SpatialFiLMFusion(dims, out_dim, **SMALL)
    assert {id(p) for p in fusion.modality_parameters("image")} == {id(p) for p in fusion.stem.parameters()}
    assert {id(p) for p in fusion.modality_parameters("text")} == {id(p) for p in fusion.film.parameters()}
