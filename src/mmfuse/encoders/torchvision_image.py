"""Any torchvision classification model as an image encoder, its classifier replaced by `nn.Identity`.

Shapes: B batch, S image side, D feature size (e.g. 2048 for ResNet-50), T = h*w spatial tokens.
"""

from __future__ import annotations

import logging

import torch
import torchvision
from torch import nn

from mmfuse.assets import load_state_dict_file, looks_like_path
from mmfuse.encoders.base import ENCODERS, EncoderOutput
from mmfuse.encoders.image_common import ImageEncoder, ImagePreprocessor, flatten_feature_map, load_headless

logger = logging.getLogger(__name__)

_HEAD_ATTRS = ("fc", "head", "heads", "classifier")


def replace_classifier(net: nn.Module) -> tuple[str, int]:
    """Replace the last `nn.Linear` of the classifier (`fc`, `head`, `heads` or `classifier`) by `nn.Identity`.

    Returns:
        The replaced layer's state-dict prefix (e.g. "fc", "classifier.1", "heads.head") and its in_features.
    """
    for attr in _HEAD_ATTRS:
        head = getattr(net, attr, None)
        if head is None:
            continue
        linears = [(name, m) for name, m in head.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            continue
        name, linear = linears[-1]
        prefix = f"{attr}.{name}" if name else attr
        parent = net.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else net
        setattr(parent, prefix.rpartition(".")[2], nn.Identity())
        return prefix, linear.in_features
    raise ValueError(f"{type(net).__name__} has no linear classifier in any of {_HEAD_ATTRS}; it cannot be an encoder")


def _build_pretrained(model: str, weights: str) -> tuple[nn.Module, str]:
    """Build `model` with torchvision's named weights (from the local torch hub cache or a download)."""
    enum = torchvision.models.get_model_weights(model)
    if weights not in enum.__members__:
        raise ValueError(
            f"unknown torchvision weights {weights!r} for {model}: choose one of {list(enum.__members__)}, "
            f"or pass a local file, e.g. `weights: /path/to/{model}.pth`"
        )
    resolved = enum[weights]
    try:
        return torchvision.models.get_model(model, weights=resolved), str(resolved)
    except OSError as err:  # urllib's URLError is an OSError
        raise OSError(
            f"torchvision weights {resolved} for {model} are not in the local cache "
            f"({torch.hub.get_dir()}/checkpoints) and cannot be downloaded: no network is available here. "
            f"Download {resolved.url} on a machine with internet and pass the local file instead, "
            f"e.g. `weights: /path/to/{model}.pth` (a torch.save state dict or a .safetensors file)."
        ) from err


def load_weights_file(net: nn.Module, path: str, head_prefix: str) -> None:
    """Load a local state dict into `net`; classifier keys (`head_prefix.*`) are dropped, anything else must fit."""
    load_headless(net, load_state_dict_file(path), path, (head_prefix,))
    logger.info("loaded %s weights from %s", type(net).__name__, path)


def stage_names(net: nn.Module) -> list[str]:
    """The layers a `stage` is usually cut at: the top-level children (not the pooling or the classifier), with the
    blocks of a `features` sequence one by one (ResNet: layer1..layer4; EfficientNet, ConvNeXt: features.0..)."""
    names = []
    for name, child in net.named_children():
        if name in ("avgpool", "flatten", *_HEAD_ATTRS):
            continue
        inner = list(child.named_children()) if isinstance(child, nn.Sequential) else []
        nested = inner and all(isinstance(m, nn.Sequential) for _, m in inner)
        names += [f"{name}.{n}" for n, _ in inner] if nested else [name]
    return names


def model_blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks of `net`, input to output: each `stage_names` layer with weights; consecutive layers that are not
    containers (a stem's conv and norm) form one block."""
    blocks: list[list[nn.Module]] = []
    merge = False
    for name in stage_names(net):
        layer = net.get_submodule(name)
        if next(layer.parameters(), None) is None:
            continue
        single = not isinstance(layer, nn.Sequential) and not list(layer.children())
        if single and merge:
            blocks[-1].append(layer)
        else:
            blocks.append([layer])
        merge = single
    return [nn.ModuleList(b) for b in blocks]


def cut_at_stage(net: nn.Module, model: str, stage: str, image_size: int) -> tuple[nn.Module, int]:
    """`net` up to layer `stage` (a graph module returning {"map": (B, C, h, w)}, later layers dropped); C.

    Raises:
        ValueError: one line naming `stage` and the usual choices, when it is no layer of `net` or its output is
            not a feature map.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    choices = f"choose a layer such as {', '.join(stage_names(net))}"
    try:
        cut = create_feature_extractor(net, return_nodes={stage: "map"})
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"stage {stage!r} is not a layer of {model}; {choices}") from err
    with torch.no_grad():
        out = cut.eval()(torch.zeros(1, 3, image_size, image_size))["map"]
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"stage {stage!r} of {model} gives {shape}, not a (B, C, h, w) feature map; {choices}")
    return cut, int(out.shape[1])


@ENCODERS.register("torchvision")
class TorchvisionImageEncoder(ImageEncoder):
    """Any torchvision classification model (ResNet, EfficientNet, ConvNeXt, ViT, ...) as an image encoder.

    Args:
        model: torchvision model name, e.g. "resnet50", "resnet18", "efficientnet_b0".
        weights: None for random initialisation; a local .pth/.pt/.safetensors state dict (classifier
            keys are ignored); or a torchvision weights name ("DEFAULT", "IMAGENET1K_V2"), which needs the
            file in the torch hub cache or a network.
        freeze: no gradients and always eval mode.
        image_size: side of the square input image.
        tokens: also return spatial tokens, the flattened last feature map (the input of `avgpool`).
        augment: random resized crop + horizontal flip in `preprocess(raw, train=True)`.
        stage: None for the final features; else the name of the layer whose output map gives the tokens
            (B, h*w, C) and pooled = their mean (B, C), the layers after it dropped (weights load into the
            whole model first): e.g. "layer2" (ResNet, stride 8), "features.3" (EfficientNet-B0, stride 8).
        unfreeze: None (the `freeze` flag decides), 0 (frozen), or N: only the last N blocks train, the others are
            frozen and stay in eval mode. Blocks (`model_blocks`): the layers `stage` chooses from that hold weights,
            the leading single layers merged into one stem (ResNet: conv1+bn1, layer1..layer4; EfficientNet:
            features.0..8).
    """

    def __init__(
        self,
        model: str = "resnet50",
        weights: str | None = None,
        freeze: bool = False,
        image_size: int = 224,
        tokens: bool = False,
        augment: bool = False,
        stage: str | None = None,
        unfreeze: int | None = None,
    ) -> None:
        super().__init__(freeze, unfreeze)
        self.model_name, self.weights, self.tokens, self.stage = model, weights, tokens, stage
        if model not in torchvision.models.list_models(module=torchvision.models):
            close = [m for m in torchvision.models.list_models(module=torchvision.models) if m.startswith(model[:6])]
            raise ValueError(
                f"unknown torchvision classification model {model!r}"
                + (f"; similar: {', '.join(close[:8])}" if close else "")
            )
        self._weights_id: str | None = None
        if weights is not None and not looks_like_path(weights):
            self.net, self._weights_id = _build_pretrained(model, weights)
            head_prefix, self.output_dim = replace_classifier(self.net)
        else:
            self.net = torchvision.models.get_model(model, weights=None)
            head_prefix, self.output_dim = replace_classifier(self.net)
            if weights is not None:
                load_weights_file(self.net, weights, head_prefix)
        self.processor = ImagePreprocessor(image_size, augment=augment)
        self._fmap: torch.Tensor | None = None
        if stage is not None:
            self.net, self.output_dim = cut_at_stage(self.net, model, stage, image_size)
        elif tokens:
            self._attach_token_hook()
        self.net.to(memory_format=torch.channels_last)
        self.finish_init()

    def _attach_token_hook(self) -> None:
        pool = getattr(self.net, "avgpool", None)
        if not isinstance(pool, nn.Module):
            raise ValueError(f"tokens=True needs a model with an `avgpool` layer; {self.model_name} has none")
        pool.register_forward_pre_hook(self._capture)
        was_training, size = self.training, self.processor.image_size
        with torch.no_grad():
            channels = self.eval()(torch.zeros(1, 3, size, size)).tokens.shape[-1]  # (1, h*w, C)
        self.train(was_training)
        if channels != self.output_dim:
            raise ValueError(
                f"tokens=True: {self.model_name}'s last feature map has {channels} channels but its pooled "
                f"features have {self.output_dim}; use a model whose classifier is a single linear layer"
            )

    def blocks(self) -> list[nn.Module]:
        return model_blocks(self.net)

    def _capture(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._fmap = args[0]  # (B, C, h, w)

    def cache_key(self) -> str:
        key = super().cache_key()
        return key if self.stage is None else f"{key}:stage={self.stage}"

    def forward(self, inputs: torch.Tensor) -> EncoderOutput:
        """(B, 3, S, S) normalised images -> pooled (B, D) and, with `tokens`, (B, h*w, D)."""
        inputs = inputs.contiguous(memory_format=torch.channels_last)  # 2-4x faster convolutions on CPU
        if self.stage is not None:
            fmap = self.net(inputs)["map"]  # (B, C, h, w)
            return EncoderOutput(
                pooled=fmap.mean(dim=(2, 3)), tokens=flatten_feature_map(fmap) if self.tokens else None
            )
        pooled = self.net(inputs)
        if not isinstance(pooled, torch.Tensor):  # Inception/GoogLeNet auxiliary outputs in train mode
            pooled = pooled[0]
        if not self.tokens:
            return EncoderOutput(pooled=pooled)
        fmap, self._fmap = self._fmap, None
        return EncoderOutput(pooled=pooled, tokens=flatten_feature_map(fmap))
