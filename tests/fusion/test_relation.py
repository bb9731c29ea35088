"""Tests for `mmfuse.fusion.relation` (and `positional.coord_grid`).

Shapes: B = 3 samples; image 12-d with 4 spatial tokens (a 2 x 2 grid), text 10-d (its pooled vector is the
question); G the width of g, P = T * T pairs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mmfuse.cli import main
from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.positional import coord_grid
from mmfuse.fusion.relation import RelationFusion
from tiny import TINY_BERT, run_config, tiny_model, write_dataset

SMALL = {"g_layers": 3, "g_dim": 6, "f_layers": 2, "f_dim": 5}


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, bias: bool = True) -> torch.Tensor:
    return x @ w[f"{name}.weight"].T + (w[f"{name}.bias"] if bias else 0)


def reference(features, w, aggregate: str, g_layers: int, h: int = 2, width: int = 2) -> torch.Tensor:
    """The paper's form by hand: one g over the concatenation [o_i; o_j; q] of every real pair, one sample at a time.

    g's first weight is the three column blocks `[A B C]` of the fusion put together, so the test checks the per-object
    split against the concatenated layer it must equal."""
    first = torch.cat([w[f"g_{k}.weight"] for k in ("in_i", "pos_i", "in_j", "pos_j", "in_q")], dim=1)
    fused = []
    for b in range(3):
        image = features["image"]
        real = [i for i in range(image.tokens.shape[1]) if image.mask is None or image.mask[b, i]]
        coords = [[-1 + 2 * (i % width) / (width - 1), -1 + 2 * (i // width) / (h - 1)] for i in range(h * width)]
        objects = {i: torch.cat([image.tokens[b, i], torch.tensor(coords[i])]) for i in real}
        q = features["text"].pooled[b]
        gs = []
        for i in real:
            for j in real:
                x = torch.relu(first @ torch.cat([objects[i], objects[j], q]) + w["g_in_q.bias"])
                for k in range(g_layers - 1):
                    x = torch.relu(linear(x, w, f"g.{2 * k}"))
                gs.append(x)
        g = torch.stack(gs)  # (pairs, G)
        if aggregate == "sum":
            pooled = g.sum(0)
        elif aggregate == "mean":
            pooled = g.mean(0)
        else:
            pooled = (torch.softmax(linear(g, w, "score").squeeze(-1), dim=0).unsqueeze(-1) * g).sum(0)
        fused.append(linear(torch.relu(linear(pooled, w, "f.0")), w, "f.3"))
    return torch.stack(fused)


def masked_image(features: dict[str, EncoderOutput]) -> dict[str, EncoderOutput]:
    """The features with image cells padded: sample 0 keeps all 4, sample 1 keeps 3, sample 2 keeps 1."""
    image = features["image"]
    mask = torch.tensor([[True] * 4, [True, False, True, True], [False, False, True, False]])
    return dict(features, image=EncoderOutput(image.pooled, image.tokens, mask))


@pytest.mark.parametrize("aggregate", ["sum", "mean", "attention"])
@pytest.mark.parametrize("chunk", [65536, 5])
def test_golden_value(aggregate, chunk, dims, out_dim, features, fixed_init) -> None:
    fusion = RelationFusion(dims, out_dim, aggregate=aggregate, max_chunk_pairs=chunk, **SMALL)
    w = fixed_init(fusion)
    for feats in (features, masked_image(features)):
        expected = reference(feats, w, aggregate, SMALL["g_layers"])
        torch.testing.assert_close(fusion(feats).fused, expected)


@pytest.mark.parametrize("aggregate", ["sum", "attention"])
def test_chunks_and_recompute_change_neither_output_nor_gradients(aggregate, dims, out_dim, features) -> None:
    """One chunk kept for backward vs many small chunks recomputed in backward: the same numbers."""
    whole = RelationFusion(dims, out_dim, aggregate=aggregate, recompute=False, **SMALL)
    chunked = RelationFusion(dims, out_dim, aggregate=aggregate, max_chunk_pairs=7, recompute=True, **SMALL)
    chunked.load_state_dict(whole.state_dict())
    feats = masked_image(features)
    outs = []
    for fusion in (whole, chunked):
        out = fusion(feats)
        (out.fused * torch.arange(out_dim)).sum().backward()
        outs.append((out.fused, out.extras["pair_weights"], [p.grad for p in fusion.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for a, b in zip(outs[0][2], outs[1][2]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("aggregate", ["sum", "mean", "attention"])
def test_padded_cells_form_no_pair(aggregate, dims, out_dim, features, new_padding) -> None:
    fusion = RelationFusion(dims, out_dim, aggregate=aggregate, **SMALL)
    feats = masked_image(features)
    image = feats["image"]
    noisy = torch.where(image.mask.unsqueeze(-1), image.tokens, 100 * torch.randn_like(image.tokens))
    before, after = fusion(feats), fusion(dict(feats, image=EncoderOutput(image.pooled, noisy, image.mask)))
    assert torch.equal(before.fused, after.fused)
    weights = before.extras["pair_weights"]  # (B, T, T)
    assert weights.shape == (3, 4, 4)
    pairs = image.mask.unsqueeze(2) & image.mask.unsqueeze(1)
    assert (weights[~pairs] == 0).all() and (weights[pairs] > 0).all()
    if aggregate == "attention":
        torch.testing.assert_close(weights.sum(dim=(1, 2)), torch.ones(3))


def test_pair_weights_are_the_norms_of_g(dims, out_dim, features, fixed_init) -> None:
    fusion = RelationFusion(dims, out_dim, **SMALL)
    fixed_init(fusion)
    weights = fusion(features).extras["pair_weights"]
    tokens, xy = features["image"].tokens, coord_grid(2, 2)
    with torch.no_grad():
        a_i, b_j = fusion.g_in_i(tokens) + fusion.g_pos_i(xy), fusion.g_in_j(tokens) + fusion.g_pos_j(xy)
        first = a_i[:, :, None] + b_j[:, None] + fusion.g_in_q.bias
        first = first + (features["text"].pooled @ fusion.g_in_q.weight.T)[:, None, None]
        g = fusion.g(torch.relu(first))  # (B, T, T, G)
    torch.testing.assert_close(weights, g.norm(dim=-1))


def test_coordinates_are_normalised_columns_and_rows() -> None:
    torch.testing.assert_close(coord_grid(2, 3), torch.tensor([[-1.0, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]]))


def test_a_mirrored_grid_gives_another_output(dims, out_dim, features) -> None:
    """The coordinates tell positions apart: the same tokens mirrored left-right are another input."""
    fusion = RelationFusion(dims, out_dim, **SMALL)
    image = features["image"]
    mirrored = image.tokens.unflatten(1, (2, 2)).flip(2).flatten(1, 2)
    out = fusion(dict(features, image=EncoderOutput(image.pooled, mirrored)))
    assert not torch.allclose(out.fused, fusion(features).fused, atol=1e-4)


def left_of_questions(n: int, g: torch.Generator) -> tuple[dict[str, EncoderOutput], torch.Tensor]:
    """A 3 x 3 grid of noise tokens (6-d) holding a red and a blue object in two random cells; the question (4-d)
    asks "is red left of blue?" or "is red above blue?". The mean token is the same whatever the answer."""
    cells = torch.stack([torch.randperm(9, generator=g)[:2] for _ in range(n)])  # (n, 2)
    image = 0.1 * torch.randn(n, 9, 6, generator=g)
    image[torch.arange(n), cells[:, 0], 0] += 1.0  # red
    image[torch.arange(n), cells[:, 1], 1] += 1.0  # blue
    question = torch.randint(0, 2, (n,), generator=g)
    text = torch.zeros(n, 4)
    text[torch.arange(n), question] = 1.0
    (rr, rc), (br, bc) = (cells[:, 0] // 3, cells[:, 0] % 3), (cells[:, 1] // 3, cells[:, 1] % 3)
    label = torch.where(question == 0, rc < bc, rr < br).long()
    return {"image": EncoderOutput(image.mean(1), image), "text": EncoderOutput(text)}, label


def relation_accuracy(fusion: nn.Module, steps: int = 150) -> float:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(fusion.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only waits, and stalls when the cores are busy
    try:
        for _ in range(steps):
            features, labels = left_of_questions(128, g)
            opt.zero_grad()
            nn.functional.cross_entropy(fusion(features).fused, labels).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    features, labels = left_of_questions(1000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (fusion.eval()(features).fused.argmax(dim=1) == labels).float().mean().item()


def test_learns_left_of_and_above_between_two_objects(seed) -> None:
    """A relation between two cells, which no pooled vector of the image holds."""
    fusion = RelationFusion({"image": 6, "text": 4}, 2, g_layers=2, g_dim=32, f_dim=32)
    assert relation_accuracy(fusion) > 0.9


@pytest.mark.parametrize(
    ("dims", "kwargs", "match"),
    [
        ({"image": 12, "text": 10, "audio": 6}, {}, "exactly two modalities"),
        ({"image": 12, "text": 10}, {"spatial": "audio"}, "set spatial to one of"),
        ({"photo": 12, "text": 10}, {}, "set spatial to one of"),
        ({"image": 12, "text": 10}, {"aggregate": "max"}, "aggregate must be one of sum, mean, attention"),
        ({"image": 12, "text": 10}, {"g_layers": 0}, "must be >= 1"),
    ],
)
def test_bad_options_raise(dims, kwargs, match, out_dim) -> None:
    with pytest.raises(ValueError, match=match):
        RelationFusion(dims, out_dim, **kwargs)


def test_a_batch_beyond_the_pair_bound_is_refused_naming_the_keys(dims, out_dim, features) -> None:
    fusion = RelationFusion(dims, out_dim, max_batch_pairs=47, **SMALL)  # 3 samples x 16 pairs = 48 rows
    with pytest.raises(ValueError, match=r"48 pair rows, beyond model.fusion.max_batch_pairs=47; lower data.batch"):
        fusion(features)
    RelationFusion(dims, out_dim, max_batch_pairs=48, **SMALL)(features)


def test_missing_tokens_and_grids_name_the_fix(dims, out_dim, features) -> None:
    fusion = RelationFusion(dims, out_dim, **SMALL)
    with pytest.raises(ValueError, match="relation needs image tokens"):
        fusion(dict(features, image=EncoderOutput(features["image"].pooled)))
    six = dict(features, image=EncoderOutput(features["image"].pooled, torch.randn(3, 6, 12)))
    with pytest.raises(ValueError, match="6 tokens, not a square grid; set the fusion option grid"):
        fusion(six)
    assert RelationFusion(dims, out_dim, grid=(2, 3), **SMALL)(six).extras["pair_weights"].shape == (3, 6, 6)


def test_modality_parameters_split_g_first_layer(dims, out_dim) -> None:
    fusion = RelationFusion(dims, out_dim, **SMALL)
    image, text = ({id(p) for p in fusion.modality_parameters(m)} for m in ("image", "text"))
    assert image == {id(fusion.g_in_i.weight), id(fusion.g_in_j.weight)}
    assert text == {id(fusion.g_in_q.weight), id(fusion.g_in_q.bias)}


@pytest.mark.parametrize("fusion", ["relation", "spatial_film"])
def test_train_refuses_an_image_encoder_without_tokens_before_training(fusion, tmp_path: Path, capsys) -> None:
    cfg = run_config(write_dataset(tmp_path / "data", n=16), max_epochs=1, cache_dir=str(tmp_path / "cache"))
    cfg["model"] = tiny_model(fusion)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"mmfuse train: error: model.fusion.spatial: {fusion} reasons over a grid of image tokens, but no encoder "
        "gives one: set tokens: true on the image encoder (torchvision, timm) or use the conv encoder"
    )
    assert not (tmp_path / "cache").exists()  # refused before any encoding
    cfg["model"]["encoders"]["photo"] = {**cfg["model"]["encoders"].pop("image"), "field": "image"}
    cfg["model"]["fusion"]["spatial"] = "photo"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "model.encoders.photo gives no grid of tokens" in capsys.readouterr().err


def test_a_batch_beyond_the_pair_bound_is_refused_before_training(tmp_path: Path, capsys) -> None:
    """batch 8 x (4 x 4 grid)^2 = 2,048 pair rows over a bound of 1,000: one line before any feature is encoded."""
    records = write_dataset(tmp_path / "data", n=12)
    cfg = run_config(records, max_epochs=1, cache_dir=str(tmp_path / "cache"))
    cfg["data"]["batch_size"] = 8
    cfg["model"] = {
        "encoders": {
            "image": {"name": "conv", "image_size": 32, "depth": 3, "width": 8},  # 4 x 4 tokens
            "text": {"name": "hf_text", "config": TINY_BERT, "max_length": 8},
        },
        "fusion": {"name": "relation", "output_dim": 8, "g_layers": 2, "g_dim": 8, "max_batch_pairs": 1000},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "mmfuse train: error: relation: a batch of 8 samples x 256 pairs (16 tokens) is 2048 pair rows, beyond "
        "model.fusion.max_batch_pairs=1000; lower data.batch_size, use a smaller grid, or raise "
        "model.fusion.max_batch_pairs if memory allows"
    )
    assert not (tmp_path / "cache").exists()  # refused before anything was encoded
