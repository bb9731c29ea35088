"""Any timm model as an image encoder (built with `num_classes=0`), and the packaged EfficientNet-Lite0.

Shapes: B batch, S image side, D feature size (1280 for EfficientNet-Lite0), T tokens.

The packaged EfficientNet-Lite0 file uses the key layout of the `efficientnet_pytorch` package;
`convert_efficientnet_pytorch` maps it onto timm's `tf_efficientnet_lite0` (an exact, strict fit,
classifier included: `_fc` -> `classifier`). Both use TF "same" padding and BatchNorm eps 1e-3, and the
weights expect inputs normalised with mean = std = 0.5, which is timm's pretrained config for this model.
"""

from __future__ import annotations

import logging

import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import group_modules
from torch import nn

from mmfuse.assets import efficientnet_lite0_file, load_state_dict_file, looks_like_path
from mmfuse.encoders.base import ENCODERS, EncoderOutput
from mmfuse.encoders.image_common import ImageEncoder, ImagePreprocessor, flatten_feature_map, load_headless

logger = logging.getLogger(__name__)

PACKAGED_MODEL = "tf_efficientnet_lite0"
# efficientnet_pytorch block layer -> timm layer, for blocks with an expansion conv (InvertedResidual)
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# ... and for the first block, which has none (DepthwiseSeparableConv)
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def convert_efficientnet_pytorch(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an `efficientnet_pytorch` state dict (`_blocks.N.*`) to a timm EfficientNet's keys.

    Flat block N is the N-th block of timm's `blocks.<stage>.<index>`, in order.
    """
    stages = enumerate(model.blocks)
    blocks = [(s, b, hasattr(block, "conv_pwl")) for s, stage in stages for b, block in enumerate(stage)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, index, expanded = blocks[int(parts[1])]
            layer = (_EXPANDED if expanded else _SEPARABLE)[parts[2]]
            out[".".join(["blocks", str(stage), str(index), layer, *parts[3:]])] = value
        else:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
    return out


def read_weights(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """A local state dict for a timm model, converted from `efficientnet_pytorch` keys when it uses them."""
    state = load_state_dict_file(path)
    if any(key.startswith("_blocks.") for key in state):
        state = convert_efficientnet_pytorch(state, model)
    return state


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict into a headless timm model; classifier keys are dropped, anything else must fit."""
    head = model.pretrained_cfg.get("classifier") or "classifier"
    load_headless(model, read_weights(model, path), path, (head,) if isinstance(head, str) else tuple(head))
    logger.info("loaded %s weights from %s", type(model).__name__, path)


def _resolve_weights(model: str, weights: str | None) -> str | None:
    if weights is None or looks_like_path(weights):
        return weights
    if weights != "packaged":
        raise ValueError(
            f"timm weights {weights!r}: use 'packaged', None (random) or a local file such as "
            f"`weights: /path/to/{model}.pth`; downloading pretrained timm weights is impossible here (no network)"
        )
    if model != PACKAGED_MODEL:
        raise ValueError(f"weights 'packaged' exist only for model {PACKAGED_MODEL!r}, not {model!r}")
    return str(efficientnet_lite0_file())


def truncate_to_stage(net: nn.Module, model: str, stage: int) -> int:
    """Remove the layers of `net` after feature level `stage` (timm's `prune_intermediate_layers`); its channels.

    Raises:
        ValueError: one line naming `stage` and its valid range (or saying the model has no feature levels).
    """
    levels = getattr(net, "feature_info", None)
    if not levels or not hasattr(net, "forward_intermediates"):
        raise ValueError(f"stage: timm model {model} has no feature levels to choose from; leave stage unset")
    strides = ", ".join(str(level["reduction"]) for level in levels)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < len(levels):
        raise ValueError(
            f"stage must be an integer in 0..{len(levels) - 1} for {model} (feature levels at strides {strides}), "
            f"got {stage!r}"
        )
    channels = int(levels[stage]["num_chs"])
    try:
        net.prune_intermediate_layers(indices=[stage], prune_norm=True, prune_head=True)
    except (AttributeError, NotImplementedError) as err:
        raise ValueError(f"stage: timm model {model} cannot be cut at a feature level ({err})") from None
    return channels


@ENCODERS.register("timm")
class TimmImageEncoder(ImageEncoder):
    """Any timm model as an image encoder; by default the packaged ImageNet EfficientNet-Lite0 (1280-d).

    Args:
        model: timm model name.
        weights: "packaged" (the EfficientNet-Lite0 file, only for tf_efficientnet_lite0), None for random
            initialisation, or a local .pth/.pt/.safetensors state dict (classifier keys are ignored).
        freeze: no gradients and always eval mode.
        image_size: side of the square input; None takes the model's pretrained config (224 for Lite0).
        tokens: also return tokens: the flattened `forward_features` map (B, h*w, D), or with `stage` that stage's map.
        augment: random resized crop + horizontal flip in `preprocess(raw, train=True)`.
        stage: None for the final features; else an index into the model's feature levels (timm's `feature_info`,
            0 = the finest; EfficientNet-Lite0 has 0-4 at strides 2, 4, 8, 16, 32 with 16, 24, 40, 112, 320
            channels): that level's map gives the tokens (B, h*w, C) and pooled = their mean (B, C), and the
            layers after it are removed (weights load into the whole model first).
        unfreeze: None (the `freeze` flag decides), 0 (frozen), or N: only the last N blocks train, the others are
            frozen and stay in eval mode. A block is one of timm's coarse parameter groups
            (`group_matcher(coarse=True)`, as timm's own layer decay): for EfficientNet the stem, then each stage,
            the last stage with conv_head/bn2 (Lite0: 8 blocks; fewer after `stage`).
    """

    def __init__(
        self,
        model: str = PACKAGED_MODEL,
        weights: str | None = "packaged",
        freeze: bool = False,
        image_size: int | None = None,
        tokens: bool = False,
        augment: bool = False,
        stage: int | None = None,
        unfreeze: int | None = None,
    ) -> None:
        super().__init__(freeze, unfreeze)
        self.model_name, self.tokens, self.stage = model, tokens, stage
        if not timm.is_model(model):
            close = timm.list_models(f"{model[:6]}*")[:8]
            raise ValueError(f"unknown timm model {model!r}" + (f"; similar: {', '.join(close)}" if close else ""))
        self.weights = _resolve_weights(model, weights)
        self.net = timm.create_model(model, pretrained=False, num_classes=0)
        if self.weights is not None:
            load_weights(self.net, self.weights)
        # pooled size; timm's MobileNetV3 has a conv after pooling, so head_hidden_size != num_features
        self.output_dim = int(getattr(self.net, "head_hidden_size", None) or self.net.num_features)
        if stage is not None:
            self.output_dim = truncate_to_stage(self.net, model, stage)
        elif tokens and self.net.num_features != self.output_dim:
            raise ValueError(f"tokens=True: {model}'s feature map size differs from its pooled size")
        cfg = resolve_model_data_config(self.net)
        size = image_size or cfg["input_size"][-1]
        self.processor = ImagePreprocessor(size, cfg["mean"], cfg["std"], cfg["interpolation"], augment)
        self._weights_id: str | None = None
        self.net.to(memory_format=torch.channels_last)
        self.finish_init()

    def cache_key(self) -> str:
        key = super().cache_key()
        return key if self.stage is None else f"{key}:stage={self.stage}"

    def blocks(self) -> list[nn.Module]:
        """timm's coarse groups of the (possibly cut) model, input to output; [] for a model without a matcher."""
        if not hasattr(self.net, "group_matcher"):
            return []
        groups = group_modules(self.net, self.net.group_matcher(coarse=True))
        return [nn.ModuleList(self.net.get_submodule(n) for n in groups[k]) for k in sorted(groups)]

    def forward(self, inputs: torch.Tensor) -> EncoderOutput:
        """(B, 3, S, S) normalised images -> pooled (B, D) and, with `tokens`, (B, T, D)."""
        inputs = inputs.contiguous(memory_format=torch.channels_last)  # 2-4x faster convolutions on CPU
        if self.stage is not None:
            fmap = self.net.forward_intermediates(inputs, indices=[self.stage], intermediates_only=True)[0]
            return EncoderOutput(
                pooled=fmap.mean(dim=(2, 3)), tokens=flatten_feature_map(fmap) if self.tokens else None
            )
        features = self.net.forward_features(inputs)  # (B, D, h, w), or (B, T, D) for transformers
        pooled = self.net.forward_head(features, pre_logits=True)  # (B, D)
        return EncoderOutput(pooled=pooled, tokens=flatten_feature_map(features) if self.tokens else None)
