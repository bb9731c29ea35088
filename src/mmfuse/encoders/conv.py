"""A small CNN trained from scratch as an image encoder: spatial tokens that keep their position.

Shapes: B batch, S image side, C channels of the last block (= D, the feature size), h x w the last map
(h = w for the square inputs), T = h*w tokens flattened row-major (token i * w + j is row i, column j).

The Sort-of-CLEVR encoders: Santoro et al. 2017 (relation networks) use 4 blocks of 24 channels, 3x3,
stride 2, BatchNorm + ReLU (the defaults here); FiLM (Perez et al. 2018) a stem of 4 such blocks of 128.
Each block is `conv(k x k, stride s, padding k // 2) -> norm -> ReLU`, so a side S becomes ceil(S / s).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from mmfuse.assets import load_state_dict_file
from mmfuse.encoders.base import ENCODERS, EncoderOutput
from mmfuse.encoders.image_common import ImageEncoder, ImagePreprocessor, flatten_feature_map
from mmfuse.text import flattened

logger = logging.getLogger(__name__)

Norm = Literal["batch", "group", "none"]


def per_block(value: int | Sequence[int], depth: int, option: str, low: int = 1) -> list[int]:
    """An int (every block) or one int per block -> `depth` ints, each >= `low`; else one-line ValueError."""
    values = [value] * depth if isinstance(value, int) else list(value)
    if len(values) != depth or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
        raise ValueError(f"{option} must be an integer >= {low} or a list of {depth} such integers (one per block)")
    return values


def conv_block(c_in: int, c_out: int, kernel_size: int, stride: int, norm: Norm) -> nn.Sequential:
    """`conv -> norm -> ReLU`; GroupNorm uses gcd(32, c_out) groups; the conv has a bias only without a norm."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv"] = nn.Conv2d(c_in, c_out, kernel_size, stride, padding=kernel_size // 2, bias=norm == "none")
    if norm == "batch":
        layers["norm"] = nn.BatchNorm2d(c_out)
    elif norm == "group":
        layers["norm"] = nn.GroupNorm(math.gcd(32, c_out), c_out)
    layers["act"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


def load_weights(net: nn.Module, path: str) -> None:
    """Load a state dict file into `net`: its keys exactly, or all of them under one prefix (a run's
    model.safetensors holds them under `encoders.<modality>.net.`, next to the fusion's and heads' keys).

    Raises:
        ValueError: one line naming the file, when its keys or shapes do not fit.
    """
    state, keys = load_state_dict_file(path), list(net.state_dict())
    prefixes = {""} if set(state) == set(keys) else {k[: -len(keys[0])] for k in state if k.endswith("." + keys[0])}
    fitting = [p for p in prefixes if all(p + k in state for k in keys)]
    if len(fitting) != 1:
        missing = [k for k in keys if k not in state][:5]
        raise ValueError(
            f"weights file {path} does not fit the conv encoder: missing keys {missing}, "
            f"unexpected keys {[k for k in state if k not in keys][:5]}"
            if not fitting
            else f"weights file {path} holds the conv encoder's keys under several prefixes {sorted(fitting)}"
        )
    try:
        net.load_state_dict({k: state[fitting[0] + k] for k in keys})
    except RuntimeError as err:  # a shape mismatch: a different width, depth or kernel size
        raise ValueError(f"weights file {path} does not fit the conv encoder: {flattened(err, 300)}") from None
    logger.info("loaded conv encoder weights from %s", path)


@ENCODERS.register("conv")
class ConvImageEncoder(ImageEncoder):
    """A small CNN trained from scratch (by default Santoro et al. 2017's): spatial tokens on a square grid.

    Always returns tokens: the last feature map flattened row-major (B, h*w, C), with h = w = ceil(S / total stride)
    (4 x 4 at 64 px with the defaults), and pooled = their mean (B, C). Inputs are normalised with mean = std = 0.5.

    Args:
        image_size: side S of the square input.
        depth: number of conv blocks.
        width: output channels, one int for every block or a list of `depth` ints; C is the last one.
        stride: stride of each block, one int for every block or a list of `depth` ints.
        kernel_size: odd side of every convolution's kernel (padding kernel_size // 2).
        norm: "batch" (BatchNorm), "group" (GroupNorm, gcd(32, channels) groups) or "none" (a conv bias instead).
        weights: None for random initialisation, or a local state dict (.pth/.pt/.safetensors) of this network,
            e.g. a run's model.safetensors (its `encoders.<modality>.net.` keys are found).
        freeze: no gradients and always eval mode; needs `weights` (a frozen random CNN would stay random).
        augment: random resized crop + horizontal flip in training (the flip swaps left and right).
    """

    def __init__(
        self,
        image_size: int = 64,
        depth: int = 4,
        width: int | list[int] = 24,
        stride: int | list[int] = 2,
        kernel_size: int = 3,
        norm: Norm = "batch",
        weights: str | None = None,
        freeze: bool = False,
        augment: bool = False,
    ) -> None:
        super().__init__(freeze)
        if freeze and weights is None:
            raise ValueError(
                "freeze: true needs trained weights (a frozen randomly initialised conv encoder learns nothing); "
                "set weights: /path/to/state_dict, or freeze: false to train it"
            )
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be one of batch, group, none, got {norm!r}")
        widths = per_block(width, depth, "width")
        strides = per_block(stride, depth, "stride")
        ins = [3, *widths[:-1]]
        blocks = [conv_block(c_in, c_out, kernel_size, s, norm) for c_in, c_out, s in zip(ins, widths, strides)]
        self.net = nn.Sequential(*blocks)
        self.output_dim = int(blocks[-1].conv.out_channels)
        self.model_name = f"conv(width={widths},stride={strides},kernel={kernel_size},norm={norm})"
        self.weights, self.tokens = weights, True
        if weights is not None:
            load_weights(self.net, weights)
        self.processor = ImagePreprocessor(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), augment=augment)
        self._weights_id: str | None = None
        self.net.to(memory_format=torch.channels_last)
        self.finish_init()

    def grid(self, image_size: int | None = None) -> tuple[int, int]:
        """The (h, w) token grid at `image_size` (default: the configured size)."""
        side = image_size or self.processor.image_size
        for block in self.net:
            side = (side - 1) // block.conv.stride[0] + 1  # = ceil(side / s) with padding k // 2, odd k
        return side, side

    def forward(self, inputs: torch.Tensor) -> EncoderOutput:
        """(B, 3, S, S) normalised images -> pooled (B, C) and tokens (B, h*w, C)."""
        fmap = self.net(inputs.contiguous(memory_format=torch.channels_last))  # (B, C, h, w)
        return EncoderOutput(pooled=fmap.mean(dim=(2, 3)), tokens=flatten_feature_map(fmap))
