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
