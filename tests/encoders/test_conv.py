"""ConvImageEncoder: a from-scratch CNN whose tokens keep their position (shapes, grids, weights, freezing, CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from mmfuse.cli import main
from mmfuse.encoders import ENCODERS
from mmfuse.encoders.conv import ConvImageEncoder
from tiny import TINY_BERT, run_config, write_dataset


def save_net(encoder: ConvImageEncoder, path: Path, prefix: str = "") -> str:
    save_file({prefix + k: v.contiguous() for k, v in encoder.net.state_dict().items()}, str(path))
    return str(path)


def test_registered() -> None:
    assert ENCODERS.get("conv") is ConvImageEncoder


@pytest.mark.parametrize(
    ("size", "options", "grid", "dim"),
    [
        (64, {}, (4, 4), 24),  # the defaults: Santoro et al.'s 4 x 24 channels, stride 2
        (128, {}, (8, 8), 24),
        (64, {"stride": [2, 2, 2, 1], "width": [8, 16, 16, 32]}, (8, 8), 32),
        (65, {"stride": [2, 2, 2, 1], "norm": "group"}, (9, 9), 24),  # ceil(65 / 8)
        (32, {"depth": 2, "width": 16, "kernel_size": 5, "norm": "none"}, (8, 8), 16),
    ],
)
def test_tokens_on_a_square_grid(size: int, options: dict, grid: tuple[int, int], dim: int, images, seed) -> None:
    encoder = ConvImageEncoder(image_size=size, **options).eval()
    batch = encoder.collate([encoder.preprocess(im) for im in images])
    assert batch.shape == (2, 3, size, size) and encoder.has_tokens
    out = encoder(batch)
    assert encoder.output_dim == dim and encoder.grid() == grid
    assert out.pooled.shape == (2, dim) and out.tokens.shape == (2, grid[0] * grid[1], dim)
    torch.testing.assert_close(out.tokens.mean(1), out.pooled)


def test_tokens_are_the_last_map_row_major(seed: int) -> None:
    encoder = ConvImageEncoder(image_size=16, depth=2).eval()
    x = torch.randn(1, 3, 16, 16)
    fmap = encoder.net(x)  # (1, 24, 4, 4)
    tokens = encoder(x).tokens
    torch.testing.assert_close(tokens[0, 1 * 4 + 2], fmap[0, :, 1, 2])  # row 1, column 2


def test_gradient_reaches_every_parameter_and_eval_is_deterministic(seed: int) -> None:
    encoder = ConvImageEncoder(image_size=32, width=[4, 8, 8, 12], norm="group")
    out = encoder(torch.randn(3, 3, 32, 32))
    (out.pooled.sum() + out.tokens.square().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    encoder.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x).tokens, encoder(x).tokens, rtol=0, atol=0)


def test_golden_value_with_fixed_weights() -> None:
    """1x1 kernels, strides 2 then 1, no norm: token (i, j) is relu(W2 relu(W1 x[:, 2i, 2j] + b1) + b2), by hand."""
    encoder = ConvImageEncoder(image_size=4, depth=2, width=[2, 3], stride=[2, 1], kernel_size=1, norm="none")
    with torch.no_grad():
        for i, p in enumerate(encoder.parameters()):  # ((arange(n) + 3 i) % 5 - 1) * 0.1
            p.copy_(((torch.arange(p.numel()) + 3 * i) % 5 - 1).reshape(p.shape) * 0.1)
    w1, b1 = torch.tensor([[-0.1, 0.0, 0.1], [0.2, 0.3, -0.1]]), torch.tensor([0.2, 0.3])
    w2, b2 = torch.tensor([[0.0, 0.1], [0.2, 0.3], [-0.1, 0.0]]), torch.tensor([0.3, -0.1, 0.0])
    x = (torch.arange(48, dtype=torch.float32).reshape(1, 3, 4, 4) - 20) / 10
    out = encoder.eval()(x)
    assert out.tokens.shape == (1, 4, 3)
    pixel = torch.tensor([-1.0, 0.6, 2.2])  # x[0, :, 2, 2], under token (1, 1) = token 3 of the 2 x 2 grid
    expected = torch.relu(w2 @ torch.relu(w1 @ pixel + b1) + b2)
    torch.testing.assert_close(out.tokens[0, 3], expected)
    torch.testing.assert_close(out.tokens[0, 3], torch.tensor([0.306, 0.022, 0.0]))


def test_freezing_random_weights_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError) as info:
        ConvImageEncoder(freeze=True)
    assert "\n" not in str(info.value) and "freeze: true needs trained weights" in str(info.value)


def test_weights_file_round_trip_and_freeze(tmp_path: Path, seed: int) -> None:
    trained = ConvImageEncoder(image_size=32, width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = save_net(trained, tmp_path / "net.safetensors")
    in_run = save_net(trained, tmp_path / "model.safetensors", prefix="encoders.image.net.")  # a run's weights
    for path in (plain, in_run):
        loaded = ConvImageEncoder(image_size=32, width=8, weights=path, freeze=True)
        assert loaded.rebuilt_from_config and not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).tokens, trained(x).tokens)
    assert ConvImageEncoder(image_size=32, width=8, weights=plain).weights_identity().startswith("sha256:")
    with pytest.raises(ValueError, match=r"net.safetensors does not fit the conv encoder: .*size mismatch") as info:
        ConvImageEncoder(image_size=32, width=16, weights=plain)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"does not fit the conv encoder: missing keys \['4.conv.weight'"):
        ConvImageEncoder(image_size=32, depth=5, width=8, weights=plain)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"depth": 0}, "depth must be an integer >= 1, got 0"),
        ({"width": [8, 8]}, "width must be an integer >= 1 or a list of 4 such integers (one per block)"),
        ({"stride": 0}, "stride must be an integer >= 1 or a list of 4 such integers (one per block)"),
        ({"kernel_size": 4}, "kernel_size must be an odd integer >= 1, got 4"),
        ({"norm": "layer"}, "norm must be one of batch, group, none, got 'layer'"),
        ({"image_size": 0}, "image_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_options_are_one_line(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        ConvImageEncoder(**options)
    assert str(info.value) == message


def test_cache_key_names_the_architecture() -> None:
    keys = {
        ConvImageEncoder().cache_key().split(":weights=")[0],
        ConvImageEncoder(stride=[2, 2, 2, 1]).cache_key().split(":weights=")[0],
        ConvImageEncoder(kernel_size=5).cache_key().split(":weights=")[0],
        ConvImageEncoder(norm="group").cache_key().split(":weights=")[0],
    }
    assert len(keys) == 4


# ---------------------------------------------------------------------- through the command line
def conv_config(tmp_path: Path, records: Path, image: dict, fusion: dict) -> Path:
    cfg = run_config(records, max_epochs=1, cache_dir=str(tmp_path / "cache"))
    cfg["model"] = {
        "encoders": {
            "image": {"name": "conv", "image_size": 32, **image},
            "text": {"name": "hf_text", "config": TINY_BERT, "max_length": 16, "freeze": False},
        },
        "fusion": {"name": "co_attention", "output_dim": 16, "hidden_dim": 16, "num_layers": 1, **fusion},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_with_conv_tokens_and_co_attention(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = write_dataset(tmp_path / "data", n=36)
    cfg = conv_config(tmp_path, records, {"width": [8, 16], "depth": 2}, {"return_weights": True})
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(summary["metrics"]["test"]) == {"color", "is_question", "size", "tags"}
    # the trained conv weights are in the run's model.safetensors: a later run can start from them, frozen
    frozen = conv_config(
        tmp_path,
        records,
        {"width": [8, 16], "depth": 2, "weights": str(tmp_path / "run" / "model.safetensors"), "freeze": True},
        {},
    )
    assert main(["train", str(frozen), "--out", str(tmp_path / "run2")]) == 0, capsys.readouterr().err


def test_cli_refuses_a_frozen_random_conv_encoder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = tmp_path / "records.jsonl"
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records.write_text(json.dumps({"image": "a.png", "text": "hi", "color": "red"}) + "\n")
    cfg = conv_config(tmp_path, records, {"freeze": True}, {})
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "mmfuse train: error: model.encoders.image: freeze: true needs trained weights (a frozen randomly "
        "initialised conv encoder learns nothing); set weights: /path/to/state_dict, or freeze: false to train it"
    )
