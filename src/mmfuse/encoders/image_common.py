"""Image preprocessing and token helpers shared by the image encoders (decoding and checking an image file,
`to_rgb_image` and `check_image`, are in `mmfuse.raw_inputs`, shared with the ONNX engine).

Shapes: B batch, C channels, H/W image or feature-map size, T = h*w spatial tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from mmfuse.assets import file_sha256, module_sha256
from mmfuse.encoders.base import Encoder, hash_file
from mmfuse.raw_inputs import DataRoot, check_image, read_image_path, to_rgb_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Milder than the ImageNet default (0.08, 1): small datasets and small objects survive the crop.
AUGMENT_SCALE = (0.5, 1.0)


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
        return read_image_path(row, field, root)

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
