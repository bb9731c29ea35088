"""Image preprocessing shared by the image encoders: RGB conversion, resize + crop, normalisation, augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfuse.encoders.image_common import IMAGENET_MEAN, ImagePreprocessor, flatten_feature_map, to_rgb_image


def test_to_rgb_image(tmp_path: Path) -> None:
    gray = Image.new("L", (10, 6), color=128)
    assert to_rgb_image(gray).mode == "RGB"
    gray.save(tmp_path / "gray.png")
    assert to_rgb_image(tmp_path / "gray.png").size == (10, 6)
    assert to_rgb_image(np.zeros((6, 10, 3), dtype=np.uint8)).size == (10, 6)
    with pytest.raises(TypeError):
        to_rgb_image(42)


def test_eval_transform_resizes_crops_and_normalises() -> None:
    processor = ImagePreprocessor(32)
    mean_image = Image.new("RGB", (80, 48), color=tuple(round(255 * m) for m in IMAGENET_MEAN))
    x = processor(mean_image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.abs().max() < 0.02  # the ImageNet mean colour normalises to ~0
    torch.testing.assert_close(processor(mean_image, train=True), x)  # no augmentation unless asked


def test_augment_only_in_training() -> None:
    processor = ImagePreprocessor(32, augment=True)
    array = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    torch.testing.assert_close(processor(image), processor(image))
    torch.manual_seed(0)
    views = [processor(image, train=True) for _ in range(4)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert not all(torch.equal(views[0], v) for v in views[1:])


def test_describe_changes_with_settings() -> None:
    keys = {
        ImagePreprocessor(32).describe(),
        ImagePreprocessor(64).describe(),
        ImagePreprocessor(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).describe(),
        ImagePreprocessor(32, interpolation="bicubic").describe(),
    }
    assert len(keys) == 4


def test_flatten_feature_map() -> None:
    fmap = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # (B, C, h, w)
    tokens = flatten_feature_map(fmap)
    assert tokens.shape == (2, 4, 3)
    assert torch.equal(tokens[1, 3], fmap[1, :, 1, 1])
    assert flatten_feature_map(tokens) is tokens  # (B, T, C) passes through
