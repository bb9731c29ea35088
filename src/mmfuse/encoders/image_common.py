"""Image preprocessing and token helpers shared by the image encoders.

Shapes: B batch, C channels, H/W image or feature-map size, T = h*w spatial tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import v2

from mmfuse.assets import file_sha256, module_sha256
from mmfuse.encoders.base import DataRoot, Encoder, InputError, field_value, hash_file
from mmfuse.files import NotRegularFileError, open_regular

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Milder than the ImageNet default (0.08, 1): small datasets and small objects survive the crop.
AUGMENT_SCALE = (0.5, 1.0)


_HIGH_DEPTH = ("I", "F")  # 32-bit integer and float images (16-bit modes "I;16*" open as these or convert to "I")


def _unit_scale(values: np.ndarray, mode: str) -> np.ndarray:
    """High-depth pixel values -> [0, 1]: by the mode's range when it is known, else by the data's own range.

    "I;16*" is 16-bit. For "I" and "F" the range is read off the values: within [0, 1] (float) is taken as
    is, within [0, 255] as 8-bit, within [0, 65535] as 16-bit; anything else (negative, larger) is stretched
    from its minimum to its maximum. NaN and infinities become 0.
    """
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if mode.startswith("I;16"):
        return values / 65535.0
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0 and high <= 1 and mode == "F":
        return values
    for top in (255.0, 65535.0):
        if low >= 0 and high <= top:
            return values / top
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def to_rgb_image(raw: Any) -> Image.Image:
    """A PIL image, an image file path or an (H, W[, C]) uint8 array, as an upright 8-bit RGB PIL image.

    EXIF orientation is applied. Every mode PNG, TIFF and JPEG files carry converts: 1, L, LA, P, PA, RGB,
    RGBA, CMYK, YCbCr as Pillow converts them (alpha dropped), and 16-bit, 32-bit integer and float images
    (I;16, I, F) scaled to 8 bits by their range (`_unit_scale`), not clipped.
    """
    if isinstance(raw, (str, Path)):
        with open_regular(raw, "image") as f, Image.open(f) as img:  # a FIFO or a device is refused, not read
            return to_rgb_image(img)
    if isinstance(raw, np.ndarray):
        raw = Image.fromarray(raw)
    if not isinstance(raw, Image.Image):
        raise TypeError(f"expected a PIL image, an image path or a uint8 array, got {type(raw).__name__}")
    image = ImageOps.exif_transpose(raw) or raw
    if image.mode.startswith("I;16") or image.mode in _HIGH_DEPTH:
        unit = _unit_scale(np.asarray(image), image.mode)
        image = Image.fromarray(np.round(unit * 255.0).clip(0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def check_image(path: str) -> str | None:
    """None if `path` is an image file that decodes fully (and converts to RGB), else the reason it is not."""
    p = Path(path)
    try:
        with open_regular(p, "image") as f, Image.open(f) as im:
            im.load()
            to_rgb_image(im)
    except FileNotFoundError:
        return f"image {p.name!r} not found (looked in {p.parent})"
    except NotRegularFileError as err:
        return f"image {p.name!r} is {str(err).rpartition(' is ')[2]} (looked in {p.parent})"
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return f"image {p.name!r} cannot be decoded ({type(err).__name__}: {str(err)[:120]}) at {p}"
    return None


class ImagePreprocessor:
    """PIL image -> normalised (3, S, S) float tensor, with optional train-time augmentation.

    Evaluation: resize the shorter side to `image_size`, centre-crop a square (only the longer side
    is cropped), scale to [0, 1], normalise. Training with `augment`: random resized crop
    (scale `AUGMENT_SCALE`) and horizontal flip instead of resize + crop.

    Args:
        image_size: side S of the square output.
        mean: per-channel mean for normalisation.
        std: per-channel standard deviation for normalisation.
        interpolation: resize interpolation ("bilinear", "bicubic", ...).
        augment: use the augmentation pipeline when called with `train=True`.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        augment: bool = False,
    ) -> None:
        self.image_size, self.augment = image_size, augment
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.interpolation = v2.InterpolationMode(interpolation)
        finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        resize = [v2.Resize(image_size, interpolation=self.interpolation), v2.CenterCrop(image_size)]
        # Resize and crop the PIL image before it becomes a tensor: PIL's resize is ~15x faster here.
        self.eval_transform = v2.Compose([*resize, v2.ToImage(), *finish])
        crop = v2.RandomResizedCrop(image_size, scale=AUGMENT_SCALE, interpolation=self.interpolation)
        self.train_transform = v2.Compose([crop, v2.RandomHorizontalFlip(), v2.ToImage(), *finish])

    def __call__(self, raw: Any, train: bool = False) -> torch.Tensor:
        transform = self.train_transform if (train and self.augment) else self.eval_transform
        return transform(to_rgb_image(raw))  # (3, S, S)

    def describe(self) -> str:
        """Everything that decides the evaluation output, for cache keys."""
        return f"size={self.image_size}:interp={self.interpolation.value}:mean={self.mean}:std={self.std}"


def load_headless(net: nn.Module, state: Mapping[str, torch.Tensor], path: str, heads: tuple[str, ...]) -> None:
    """Load `state` (read from `path`) into `net` without its classifier (`heads`' keys are dropped); the rest must fit.

    Raises:
        ValueError: one line naming the file, and the first missing or unexpected keys.
    """
    state = {k: v for k, v in state.items() if not k.startswith(tuple(h + "." for h in heads))}
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"weights file {path} does not fit {type(net).__name__}: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = (f"{keys[:5]}{'...' if len(keys) > 5 else ''}" for keys in result)
        raise ValueError(
            f"weights file {path} does not fit {type(net).__name__}: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )


def stack_images(items: list[torch.Tensor]) -> torch.Tensor:
    """Preprocessed (3, S, S) images -> (B, 3, S, S)."""
    return torch.stack(items)


def flatten_feature_map(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, h*w, C) spatial tokens; (B, T, C) token sequences pass through."""
    if fmap.ndim == 3:
        return fmap
    return fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)


class ImageEncoder(Encoder):
    """What the image encoders share: preprocessing, batching, weights identity and cache key.

    Subclasses set `net`, `model_name`, `weights` (None for random init, else a file path or a
    torchvision weights name), `processor` (an ImagePreprocessor), `tokens` and `augment`.
    """

    modality = "image"
    groups_records = True
    net: nn.Module
    model_name: str
    weights: str | None
    processor: ImagePreprocessor
    tokens: bool

    @property
    def augment(self) -> bool:  # type: ignore[override]
        return self.processor.augment

    @property
    def has_tokens(self) -> bool:
        return self.tokens

    def read(self, row: Mapping[str, Any], field: str, root: DataRoot) -> str | None:
        """The image file's absolute path, confined to the data folder; None when the field is null or empty."""
        value = field_value(row, field)
        if value is None:
            return None
        if not isinstance(value, str):
            raise InputError(f"field {field!r} must be an image path, got {type(value).__name__} {value!r:.40}")
        return root.resolve(value, "image")

    def check(self, ref: Hashable) -> str | None:
        """None if the file decodes fully, else why not (missing, a folder, truncated, not an image)."""
        return check_image(str(ref))

    def load(self, ref: Hashable) -> Image.Image:
        """The image file, decoded as upright 8-bit RGB (`to_rgb_image`)."""
        return to_rgb_image(str(ref))

    def content_hash(self, ref: Hashable) -> str:
        return hash_file(str(ref))

    def placeholder(self) -> torch.Tensor:
        """(3, S, S) zeros (the model zeroes a missing image's features anyway)."""
        size = self.processor.image_size
        return torch.zeros(3, size, size)

    def preprocess(self, raw: Any, train: bool = False) -> torch.Tensor:
        """One PIL image (or path, or uint8 array) -> (3, S, S)."""
        return self.processor(raw, train=train)

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        """(3, S, S) images -> (B, 3, S, S)."""
        return stack_images(items)

    def weights_digest(self) -> str:
        return "random:" + module_sha256(self.net) if self.weights is None else "sha256:" + file_sha256(self.weights)

    def cache_key(self) -> str:
        """Class, model, weights identity (file content hash), preprocessing and the tokens flag.

        The key describes the weights as built; cache only frozen encoders' features.
        """
        return (
            f"{type(self).__name__}:model={self.model_name}:weights={self.weights_identity()}:"
            f"{self.processor.describe()}:tokens={self.tokens}"
        )
