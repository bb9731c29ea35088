"""mmfuse.assets: packaged asset paths, weight-file reading and content hashes (used by the encoders)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mmfuse import assets


def test_packaged_assets_exist() -> None:
    assert (assets.minilm_dir() / "config.json").is_file()
    assert assets.efficientnet_lite0_file().is_file()


def test_load_state_dict_file(tmp_path: Path) -> None:
    state = {"w": torch.arange(4.0)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("ckpt.pt", "w.safetensors"):
        assert torch.equal(assets.load_state_dict_file(tmp_path / name)["w"], state["w"])
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt"):
        assets.load_state_dict_file(tmp_path / "list.pt")


def test_hashes_follow_content(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"weights")
    (tmp_path / "b.bin").write_bytes(b"weights")
    assert assets.file_sha256(tmp_path / "a.bin") == assets.file_sha256(tmp_path / "b.bin")
    (tmp_path / "b.bin").write_bytes(b"other weights")
    assert assets.file_sha256(tmp_path / "a.bin") != assets.file_sha256(tmp_path / "b.bin")
    before = assets.dir_sha256(tmp_path)
    (tmp_path / "c.json").write_text("{}")
    assert assets.dir_sha256(tmp_path) != before


def test_module_hash(seed: int) -> None:
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    assert assets.module_sha256(a) != assets.module_sha256(b)
    b.load_state_dict(a.state_dict())
    assert assets.module_sha256(a) == assets.module_sha256(b)
    assert assets.module_sha256(a) != assets.module_sha256(a.to(torch.float64))


def test_looks_like_path() -> None:
    assert assets.looks_like_path("/tmp/resnet50.pth")
    assert assets.looks_like_path("weights.safetensors")
    assert not assets.looks_like_path("IMAGENET1K_V2")
    assert not assets.looks_like_path("DEFAULT")
