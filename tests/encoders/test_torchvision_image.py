"""TorchvisionImageEncoder: classifier replaced, sizes derived, local weights, offline errors, tokens."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from mmfuse.encoders import ENCODERS
from mmfuse.encoders.torchvision_image import TorchvisionImageEncoder

SIZE = 64


def encode(encoder: TorchvisionImageEncoder, images: list[Image.Image]) -> torch.Tensor:
    batch = encoder.collate([encoder.preprocess(im) for im in images])
    with torch.no_grad():
        return encoder.eval()(batch).pooled


def test_registered() -> None:
    assert ENCODERS.get("torchvision") is TorchvisionImageEncoder


@pytest.mark.parametrize(("model", "dim"), [("resnet18", 512), ("resnet50", 2048)])
def test_features_not_logits(model: str, dim: int, images: list[Image.Image], seed: int) -> None:
    encoder = TorchvisionImageEncoder(model, image_size=SIZE)
    assert isinstance(encoder.net.fc, nn.Identity)
    assert encoder.output_dim == dim
    batch = encoder.collate([encoder.preprocess(im) for im in images])
    assert batch.shape == (2, 3, SIZE, SIZE)
    out = encoder(batch)
    assert out.pooled.shape == (2, dim)
    assert out.tokens is None and out.mask is None


def test_other_families_replace_last_linear(seed: int) -> None:
    encoder = TorchvisionImageEncoder("mobilenet_v3_small", image_size=SIZE)
    assert isinstance(encoder.net.classifier[-1], nn.Identity)
    assert encoder.output_dim == 1024
    assert encoder(torch.randn(2, 3, SIZE, SIZE)).pooled.shape == (2, 1024)


def test_model_without_linear_classifier_is_refused() -> None:
    with pytest.raises(ValueError, match="no linear classifier"):
        TorchvisionImageEncoder("squeezenet1_0", image_size=SIZE)
    with pytest.raises(ValueError, match="unknown torchvision"):
        TorchvisionImageEncoder("resnet_does_not_exist")


def test_spatial_tokens(images: list[Image.Image], seed: int) -> None:
    encoder = TorchvisionImageEncoder("resnet18", image_size=SIZE, tokens=True).eval()
    out = encoder(encoder.collate([encoder.preprocess(im) for im in images]))
    assert out.tokens is not None and out.tokens.shape == (2, (SIZE // 32) ** 2, 512)
    assert out.mask is None
    # the tokens are the map that avgpool averages into `pooled`
    torch.testing.assert_close(out.tokens.mean(1), out.pooled)


def test_tokens_need_matching_channels() -> None:
    with pytest.raises(ValueError, match="576 channels"):
        TorchvisionImageEncoder("mobilenet_v3_small", image_size=SIZE, tokens=True)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_round_trip(suffix: str, tmp_path: Path, images: list[Image.Image], seed: int) -> None:
    reference = torchvision.models.resnet18()  # with its 1000-way fc: classifier keys must be dropped
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        save_file(reference.state_dict(), str(path))
    encoder = TorchvisionImageEncoder("resnet18", weights=str(path), image_size=SIZE)
    reference.fc = nn.Identity()
    expected = reference.eval()(encoder.collate([encoder.preprocess(im) for im in images]))
    torch.testing.assert_close(encode(encoder, images), expected.detach())


def test_weights_that_do_not_fit_name_the_file(tmp_path: Path) -> None:
    state = torchvision.models.resnet18().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"broken\.pth.*layer1\.0\.conv1\.weight.*extra\.weight"):
        TorchvisionImageEncoder("resnet18", weights=str(path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        TorchvisionImageEncoder("resnet18", weights=str(tmp_path / "missing.pth"))


def test_download_request_says_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(OSError, match=r"no network is available.*weights: /path/to/resnet18\.pth"):
        TorchvisionImageEncoder("resnet18", weights="DEFAULT")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        TorchvisionImageEncoder("resnet18", weights="NOT_A_WEIGHTS_NAME")


def test_cache_key(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "a.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    key = TorchvisionImageEncoder("resnet18", weights=str(path), image_size=SIZE).cache_key()
    assert key == TorchvisionImageEncoder("resnet18", weights=str(path), image_size=SIZE).cache_key()
    shutil.copy(path, tmp_path / "b.pth")  # the content, not the path, identifies weights
    assert key == TorchvisionImageEncoder("resnet18", weights=str(tmp_path / "b.pth"), image_size=SIZE).cache_key()
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "c.pth")  # new random weights
    others = [
        TorchvisionImageEncoder("resnet18", weights=str(tmp_path / "c.pth"), image_size=SIZE),
        TorchvisionImageEncoder("resnet18", weights=str(path), image_size=SIZE + 32),
        TorchvisionImageEncoder("resnet18", weights=str(path), image_size=SIZE, tokens=True),
    ]
    assert len({key, *(e.cache_key() for e in others)}) == 4


# ---------------------------------------------------------------------- stage: tokens from an earlier layer
@pytest.mark.parametrize(
    ("model", "stage", "size", "grid", "dim"),
    [
        ("resnet18", "layer2", 64, 8, 128),  # stride 8
        ("resnet18", "layer3", 128, 8, 256),  # stride 16
        ("efficientnet_b0", "features.3", 128, 16, 40),  # stride 8
    ],
)
def test_stage_tokens_keep_an_earlier_grid(model: str, stage: str, size: int, grid: int, dim: int, seed: int) -> None:
    encoder = TorchvisionImageEncoder(model, image_size=size, tokens=True, stage=stage)
    out = encoder(torch.randn(2, 3, size, size))
    assert encoder.output_dim == dim
    assert out.tokens.shape == (2, grid * grid, dim) and out.pooled.shape == (2, dim)
    torch.testing.assert_close(out.tokens.mean(1), out.pooled)
    (out.pooled.sum() + out.tokens.square().sum()).backward()
    assert [n for n, p in encoder.named_parameters() if p.grad is None] == []  # the later layers are gone
    encoder.eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x).tokens, encoder(x).tokens, rtol=0, atol=0)


def test_stage_with_local_weights_matches_the_whole_model(tmp_path: Path, seed: int) -> None:
    reference = torchvision.models.resnet18().eval()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    encoder = TorchvisionImageEncoder("resnet18", weights=str(path), image_size=SIZE, tokens=True, stage="layer2")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        r = reference
        expected = r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))  # (2, 128, 8, 8)
        torch.testing.assert_close(encoder.eval()(x).tokens, expected.flatten(2).transpose(1, 2))
    assert encoder.cache_key().endswith(":stage=layer2")


@pytest.mark.parametrize(
    ("model", "stage", "message"),
    [
        (
            "resnet18",
            "layer9",
            "stage 'layer9' is not a layer of resnet18; choose a layer such as conv1, bn1, relu, maxpool, layer1, "
            "layer2, layer3, layer4",
        ),
        (
            "efficientnet_b0",
            "classifier",
            "stage 'classifier' of efficientnet_b0 gives (1, 1280), not a (B, C, h, w) feature map; choose a layer "
            "such as features.0, features.1, features.2, features.3, features.4, features.5, features.6, "
            "features.7, features.8",
        ),
    ],
)
def test_bad_stage_is_one_line(model: str, stage: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        TorchvisionImageEncoder(model, image_size=SIZE, stage=stage)
    assert str(info.value) == message
