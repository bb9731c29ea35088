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


# (mode, file format, pixel value, expected 8-bit gray value after conversion)
MODES = [
    ("1", "PNG", 1, 255),
    ("L", "JPEG", 128, 128),
    ("LA", "PNG", (128, 200), 128),
    ("P", "PNG", 0, None),
    ("PA", "TIFF", (0, 255), None),
    ("RGB", "JPEG", (90, 90, 90), 90),
    ("RGBA", "PNG", (90, 90, 90, 255), 90),
    ("CMYK", "TIFF", (0, 0, 0, 0), 255),
    ("YCbCr", "TIFF", (128, 128, 128), 128),
    ("I;16", "PNG", 30000, round(30000 / 65535 * 255)),
    ("I;16", "TIFF", 65535, 255),
    ("I", "TIFF", 30000, round(30000 / 65535 * 255)),
    ("I", "TIFF", 100, 100),
    ("F", "TIFF", 0.5, 128),
    ("F", "TIFF", 200.0, 200),
]


@pytest.mark.parametrize(("mode", "fmt", "value", "gray"), MODES, ids=[f"{m}-{f}-{v}" for m, f, v, _ in MODES])
def test_every_file_mode_converts_to_8bit_rgb_scaled_not_clipped(tmp_path: Path, mode, fmt, value, gray) -> None:
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new(mode, (8, 6), value).save(path, fmt)
    image = to_rgb_image(path)
    assert image.mode == "RGB" and image.size == (8, 6)
    pixels = np.asarray(image)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) == 1  # a flat image stays flat
    if gray is not None:
        assert abs(int(pixels[0, 0, 0]) - gray) <= 1 and pixels[0, 0, 0] == pixels[0, 0, 2]


def test_a_16bit_gradient_keeps_its_contrast(tmp_path: Path) -> None:
    ramp = np.linspace(0, 40000, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")
    out = np.asarray(to_rgb_image(tmp_path / "ramp.png"))[..., 0].astype(int)
    expected = np.round(ramp / 65535 * 255).astype(int)
    assert np.abs(out - expected).max() <= 1 and (out == 255).sum() == 0  # nothing clipped to white


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)  # left half red, right half blue, as stored
    arr[:, 10:] = (0, 0, 255)
    image = Image.fromarray(arr)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = np.asarray(to_rgb_image(tmp_path / "rotated.jpg")).astype(int)
    assert upright.shape == (20, 10, 3)  # taller than wide once turned
    assert upright[2, 5, 0] > 200 and upright[2, 5, 2] < 60  # the stored left (red) is now on top
    assert upright[17, 5, 2] > 200 and upright[17, 5, 0] < 60


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
