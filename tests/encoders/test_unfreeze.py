"""`unfreeze: N`: only the last N blocks of an encoder train; the others keep their weights, BatchNorm statistics
and eval mode; a partly unfrozen encoder is never served from the feature cache; bad values are one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmfuse.builders import build_model
from mmfuse.config import ConfigError
from mmfuse.encoders.hf_text import HFTextEncoder
from mmfuse.encoders.timm_image import TimmImageEncoder
from mmfuse.encoders.torchvision_image import TorchvisionImageEncoder
from mmfuse.train.data import cached_modalities
from tiny import TINY_BERT, tiny_model

LITE0 = dict(model="tf_efficientnet_lite0", weights=None, image_size=32)


def trainable_names(encoder: nn.Module) -> set[str]:
    return {n for n, p in encoder.named_parameters() if p.requires_grad}


def test_timm_lite0_blocks_are_stem_stages_and_head() -> None:
    enc = TimmImageEncoder(**LITE0)
    blocks = enc.blocks()
    assert len(blocks) == 8  # stem, stages 0-5, stage 6 with conv_head/bn2
    covered = {id(p) for b in blocks for p in b.parameters()}
    assert covered == {id(p) for p in enc.parameters()}, "every parameter is in a block"
    assert {id(p) for p in blocks[-1].parameters()} == {
        id(p) for m in (enc.net.blocks[6], enc.net.conv_head, enc.net.bn2) for p in m.parameters()
    }
    assert len(TimmImageEncoder(**LITE0, stage=2).blocks()) == 4  # cut after stage 2: stem, stages 0-2


def test_timm_unfreeze_trains_only_the_last_blocks(seed: int) -> None:
    enc = TimmImageEncoder(**LITE0, unfreeze=2).train()
    want = {
        f"net.{n}"
        for n, _ in enc.net.named_parameters()
        if n.startswith(("blocks.5.", "blocks.6.", "conv_head.", "bn2."))
    }
    assert trainable_names(enc) == want
    assert not enc.frozen and enc.training
    assert enc.net.blocks[6][0].bn1.training and enc.net.blocks[5][0].bn1.training
    assert not enc.net.blocks[4][0].bn1.training and not enc.net.bn1.training, "frozen blocks stay in eval mode"
    frozen_stats = enc.net.blocks[4][0].bn1.running_mean.clone()
    trained_stats = enc.net.blocks[6][0].bn1.running_mean.clone()
    out = enc(torch.randn(4, 3, 32, 32))
    assert torch.equal(enc.net.blocks[4][0].bn1.running_mean, frozen_stats)
    assert not torch.equal(enc.net.blocks[6][0].bn1.running_mean, trained_stats)
    out.pooled.sum().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)
    assert all(p.grad is None for p in enc.parameters() if not p.requires_grad)
    enc.eval()
    assert not enc.net.blocks[6][0].bn1.training


def test_torchvision_resnet_blocks_are_stem_and_layers() -> None:
    enc = TorchvisionImageEncoder(model="resnet18", image_size=32, unfreeze=2)
    blocks = enc.blocks()
    assert len(blocks) == 5
    assert [{id(p) for p in b.parameters()} for b in blocks[1:]] == [
        {id(p) for p in getattr(enc.net, f"layer{i}").parameters()} for i in range(1, 5)
    ]
    assert {id(p) for p in blocks[0].parameters()} == {
        id(p) for p in [*enc.net.conv1.parameters(), *enc.net.bn1.parameters()]
    }
    assert trainable_names(enc) == {
        n for n, _ in enc.named_parameters() if n.startswith(("net.layer3.", "net.layer4."))
    }
    enc.train()
    assert enc.net.layer4.training and not enc.net.layer2.training and not enc.net.bn1.training
    assert len(TorchvisionImageEncoder(model="resnet18", image_size=32, stage="layer2").blocks()) == 3


def test_hf_text_blocks_are_embeddings_layers_and_the_pooler_it_reads() -> None:
    mean = HFTextEncoder(config=TINY_BERT, max_length=16, unfreeze=1)
    assert len(mean.blocks()) == 3  # embeddings + 2 layers (mean pooling never reads the pooler)
    assert trainable_names(mean) == {n for n, _ in mean.named_parameters() if n.startswith("model.encoder.layer.1.")}
    pooler = HFTextEncoder(config=TINY_BERT, max_length=16, pooling="pooler", unfreeze=2)
    assert len(pooler.blocks()) == 4
    assert trainable_names(pooler) == {
        n for n, _ in pooler.named_parameters() if n.startswith(("model.encoder.layer.1.", "model.pooler."))
    }
    pooler.train()
    assert pooler.model.encoder.layer[1].training and not pooler.model.encoder.layer[0].training


def test_unfreeze_zero_is_frozen_and_all_blocks_is_all_trainable() -> None:
    frozen = TorchvisionImageEncoder(model="resnet18", image_size=32, unfreeze=0)
    assert frozen.frozen and not trainable_names(frozen)
    every = TorchvisionImageEncoder(model="resnet18", image_size=32, unfreeze=5)
    assert trainable_names(every) == {n for n, _ in every.named_parameters()}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"unfreeze": 9}, "unfreeze: 9 exceeds the 8 blocks of this encoder; use 1..8"),
        ({"unfreeze": 2, "freeze": True}, "freeze: true and unfreeze: 2 contradict each other"),
        ({"unfreeze": -1}, "unfreeze: must be an integer from 0"),
    ],
)
def test_bad_unfreeze_is_one_config_line(options: dict, message: str) -> None:
    cfg = {"model": tiny_model(freeze=False), "tasks": {"t": {"kind": "binary"}}}
    cfg["model"]["encoders"]["image"] = {"name": "timm", **LITE0, **options}
    with pytest.raises(ConfigError, match="model.encoders.image") as err:
        build_model(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unfreeze_on_an_encoder_without_blocks_is_refused() -> None:
    cfg = {"model": tiny_model(freeze=False), "tasks": {"t": {"kind": "binary"}}}
    cfg["model"]["encoders"]["image"] = {"name": "tabular", "numeric": ["a"], "unfreeze": 1}
    with pytest.raises(ConfigError, match="unfreeze"):
        build_model(cfg)


def test_a_partly_unfrozen_encoder_is_not_cached() -> None:
    cfg = {"model": tiny_model(freeze=True), "tasks": {"t": {"kind": "binary"}}}
    cfg["model"]["encoders"]["image"].update(freeze=False, unfreeze=1)
    model = build_model(cfg)
    assert cached_modalities(model, cache=True) == ["text"]
    assert not model.encoders["image"].rebuilt_from_config, "its weights change: checkpoints keep them"
    cfg["model"]["encoders"]["image"].update(unfreeze=0)
    assert cached_modalities(build_model(cfg), cache=True) == ["image", "text"]
