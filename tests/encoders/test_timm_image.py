"""TimmImageEncoder: random timm models, local weights, and the packaged ImageNet EfficientNet-Lite0."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from mmfuse.assets import efficientnet_lite0_file
from mmfuse.encoders import ENCODERS
from mmfuse.encoders.timm_image import TimmImageEncoder, read_weights

SIZE = 64
PALACE, DAISY = 698, 985  # ImageNet-1k class indices (timm.data.ImageNetInfo)


def test_registered() -> None:
    assert ENCODERS.get("timm") is TimmImageEncoder


def test_random_model_shapes(images: list[Image.Image], seed: int) -> None:
    encoder = TimmImageEncoder("resnet18", weights=None, image_size=SIZE, tokens=True)
    assert encoder.output_dim == 512
    batch = encoder.collate([encoder.preprocess(im) for im in images])
    assert batch.shape == (2, 3, SIZE, SIZE)
    out = encoder.eval()(batch)
    assert out.pooled.shape == (2, 512)
    assert out.tokens is not None and out.tokens.shape == (2, (SIZE // 32) ** 2, 512)
    torch.testing.assert_close(out.tokens.mean(1), out.pooled)


def test_pooled_size_after_head_conv(seed: int) -> None:
    # timm's MobileNetV3 convolves after pooling: output_dim follows the pooled vector, not num_features
    encoder = TimmImageEncoder("mobilenetv3_small_050", weights=None, image_size=SIZE)
    assert encoder.output_dim == encoder(torch.randn(2, 3, SIZE, SIZE)).pooled.shape[-1] == 1024


def test_packaged_only_for_lite0() -> None:
    with pytest.raises(ValueError, match="only for model 'tf_efficientnet_lite0'"):
        TimmImageEncoder("resnet18", weights="packaged")
    with pytest.raises(ValueError, match="no network"):
        TimmImageEncoder("resnet18", weights="imagenet")


def test_local_weights_round_trip(tmp_path: Path, images: list[Image.Image], seed: int) -> None:
    reference = timm.create_model("resnet18", pretrained=False).eval()  # with its classifier
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    encoder = TimmImageEncoder("resnet18", weights=str(path), image_size=SIZE).eval()
    batch = encoder.collate([encoder.preprocess(im) for im in images])
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(batch), pre_logits=True)
        torch.testing.assert_close(encoder(batch).pooled, expected)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        TimmImageEncoder("resnet18", weights=str(tmp_path / "bad.pth"))


def test_image_size_overrides_pretrained_config() -> None:
    default = TimmImageEncoder("resnet18", weights=None)
    small = TimmImageEncoder("resnet18", weights=None, image_size=SIZE)
    assert default.processor.image_size == 224 and small.processor.image_size == SIZE
    assert default.processor.interpolation.value == "bicubic"


@pytest.mark.slow
def test_packaged_lite0_imagenet_top5() -> None:
    """The packaged weights, mapped onto timm's layout, classify real photos sensibly."""
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # with the 1000-way classifier
    full.load_state_dict(read_weights(full, str(efficientnet_lite0_file())), strict=True)
    full.eval()
    encoder = TimmImageEncoder(freeze=True)  # same weights, headless, same preprocessing
    assert encoder.output_dim == 1280
    assert encoder.processor.mean == (0.5, 0.5, 0.5)
    photos = [encoder.preprocess(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    batch = encoder.collate(photos)  # (2, 3, 224, 224)
    with torch.no_grad():
        top5 = full(batch).topk(5).indices
        pooled = encoder(batch).pooled
        expected = full.forward_head(full.forward_features(batch), pre_logits=True)
    assert PALACE in top5[0].tolist()  # china.jpg: a Chinese palace (seen: palace, bell cote, monastery, ...)
    assert DAISY in top5[1].tolist()  # flower.jpg: a daisy-like flower (seen: daisy, mushroom, bee, ...)
    assert pooled.shape == (2, 1280)
    torch.testing.assert_close(pooled, expected)


@pytest.mark.slow
def test_packaged_cache_key_hashes_the_file() -> None:
    from mmfuse.assets import file_sha256

    encoder = TimmImageEncoder(image_size=SIZE)
    assert file_sha256(efficientnet_lite0_file()) in encoder.cache_key()
    assert f"size={SIZE}" in encoder.cache_key()
    assert encoder.cache_key() != TimmImageEncoder().cache_key()


# ---------------------------------------------------------------------- stage: tokens from an earlier feature level
@pytest.mark.parametrize(
    ("model", "stage", "size", "grid", "dim"),
    [
        ("tf_efficientnet_lite0", 2, 128, 16, 40),  # stride 8
        ("tf_efficientnet_lite0", 3, 128, 8, 112),  # stride 16
        ("tf_efficientnet_lite0", 3, 64, 4, 112),
        ("resnet18", 2, 64, 8, 128),
        ("resnet18", 2, 96, 12, 128),
    ],
)
def test_stage_tokens_keep_an_earlier_grid(model: str, stage: int, size: int, grid: int, dim: int, seed) -> None:
    encoder = TimmImageEncoder(model, weights=None, image_size=size, tokens=True, stage=stage)
    out = encoder.eval()(torch.randn(2, 3, size, size))
    assert encoder.output_dim == dim and encoder.has_tokens
    assert out.tokens.shape == (2, grid * grid, dim) and out.pooled.shape == (2, dim)
    torch.testing.assert_close(out.tokens.mean(1), out.pooled)
    pooled_only = TimmImageEncoder(model, weights=None, image_size=size, stage=stage)(torch.randn(1, 3, size, size))
    assert pooled_only.tokens is None and pooled_only.pooled.shape == (1, dim)


def test_stage_removes_the_later_layers_and_every_parameter_gets_a_gradient(seed: int) -> None:
    whole = TimmImageEncoder("resnet18", weights=None, image_size=SIZE)
    encoder = TimmImageEncoder("resnet18", weights=None, image_size=SIZE, tokens=True, stage=1)
    assert sum(p.numel() for p in encoder.parameters()) < sum(p.numel() for p in whole.parameters()) / 10
    out = encoder(torch.randn(2, 3, SIZE, SIZE))
    (out.pooled.sum() + out.tokens.square().sum()).backward()
    assert [n for n, p in encoder.named_parameters() if p.grad is None] == []
    assert encoder.cache_key().endswith(":stage=1") and "stage" not in whole.cache_key()


def test_stage_with_local_weights_matches_the_whole_model(tmp_path: Path, seed: int) -> None:
    reference = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    encoder = TimmImageEncoder("resnet18", weights=str(path), image_size=SIZE, tokens=True, stage=2).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=[2], intermediates_only=True)[0]  # (2, 128, 8, 8)
        torch.testing.assert_close(encoder(x).tokens, expected.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("stage", [5, -1])
def test_stage_out_of_range_is_one_line(stage: int) -> None:
    with pytest.raises(ValueError) as info:
        TimmImageEncoder("tf_efficientnet_lite0", weights=None, stage=stage)
    assert str(info.value) == (
        f"stage must be an integer in 0..4 for tf_efficientnet_lite0 (feature levels at strides 2, 4, 8, 16, 32), "
        f"got {stage}"
    )


def test_cli_names_the_stage_option_and_its_range(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from mmfuse.cli import main
    from tiny import run_config

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = tmp_path / "records.jsonl"
    records.write_text('{"image": "a.png", "text": "hi", "color": "red"}\n')
    cfg = run_config(records)
    cfg["model"]["encoders"]["image"] = {"name": "timm", "model": "resnet18", "weights": None, "stage": 9}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        "mmfuse train: error: model.encoders.image: stage must be an integer in 0..4 for resnet18 "
        "(feature levels at strides 2, 4, 8, 16, 32), got 9"
    )


@pytest.mark.slow
def test_packaged_lite0_at_stride_8_gives_16x16_tokens_of_the_whole_model() -> None:
    """The packaged weights load (then the layers after the stage go): stage 2 at 128 px is the full model's map."""
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    full.load_state_dict(read_weights(full, str(efficientnet_lite0_file())), strict=True)
    full.eval()
    encoder = TimmImageEncoder(image_size=128, tokens=True, stage=2, freeze=True)
    assert encoder.output_dim == 40 and encoder.rebuilt_from_config
    batch = encoder.collate([encoder.preprocess(load_sample_image("china.jpg"))])
    with torch.no_grad():
        expected = full.forward_intermediates(batch, indices=[2], intermediates_only=True)[0]  # (1, 40, 16, 16)
        out = encoder(batch)
    assert out.tokens.shape == (1, 256, 40)
    # channels_last convolutions round differently: 2e-5 apart
    torch.testing.assert_close(out.tokens, expected.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)
    assert expected.abs().mean() > 0.1  # real features, not zeros
