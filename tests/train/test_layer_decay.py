"""`train.layer_decay`: an encoder's block at depth k from the top trains at `encoder_lr * decay**k`, in groups tagged
with the modality; a decay that would change nothing is one line; through the CLI the optimiser holds those rates and
the frozen blocks of `unfreeze: N` keep their loaded weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import load_file

from mmfuse.builders import build_model
from mmfuse.cli import main
from mmfuse.config import ConfigError
from mmfuse.mtl import WEIGHTINGS
from mmfuse.train.module import MMFuseModule, check_layer_decay
from tiny import run_config, tiny_model, write_dataset

LITE0 = {"name": "timm", "model": "tf_efficientnet_lite0", "weights": None, "image_size": 32}


def model_with(image: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"model": tiny_model(freeze=True), "tasks": {"t": {"kind": "binary"}}}
    cfg["model"]["encoders"]["image"] = image
    return build_model(cfg)


def optimizer_of(model: torch.nn.Module, decay: float) -> torch.optim.Optimizer:
    module = MMFuseModule(model, WEIGHTINGS.get("equal")(list(model.tasks)), lr=1.0, encoder_lr=0.1, layer_decay=decay)
    return module._optimizer()


def test_each_block_gets_encoder_lr_times_decay_to_its_depth() -> None:
    model = model_with({**LITE0, "unfreeze": 3})
    opt = optimizer_of(model, 0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    modality_of = {id(p): g.get("modality") for g in opt.param_groups for p in g["params"]}
    net = model.encoders["image"].net
    # expected by name, not through Encoder.blocks(): stage 6 + head on top, then stages 5 and 4
    want = {"blocks.6.": 0.1, "conv_head.": 0.1, "bn2.": 0.1, "blocks.5.": 0.05, "blocks.4.": 0.025}
    for name, p in net.named_parameters():
        rate = next((lr for prefix, lr in want.items() if name.startswith(prefix)), None)
        if rate is None:
            assert id(p) not in lr_of, f"{name} is frozen and in no group"
        else:
            assert lr_of[id(p)] == pytest.approx(rate), name
            assert modality_of[id(p)] == "image", "every encoder group keeps its modality tag"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(id(p) for g in opt.param_groups for p in g["params"]), "each once"


def test_without_decay_an_encoder_is_one_group_at_encoder_lr() -> None:
    model = model_with({**LITE0, "unfreeze": 3})
    groups = [g for g in optimizer_of(model, 1.0).param_groups if g["lr"] == 0.1]
    assert len(groups) == 1 and groups[0]["modality"] == "image"


def test_a_fully_trainable_encoder_decays_over_all_its_blocks() -> None:
    model = model_with({"name": "torchvision", "model": "resnet18", "image_size": 32})
    opt = optimizer_of(model, 0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    net = model.encoders["image"].net
    assert lr_of[id(net.layer4[0].conv1.weight)] == pytest.approx(0.1)
    assert lr_of[id(net.layer1[0].conv1.weight)] == pytest.approx(0.1 * 0.5**3)
    assert lr_of[id(net.conv1.weight)] == pytest.approx(0.1 * 0.5**4)
    assert lr_of[id(net.bn1.weight)] == pytest.approx(0.1 * 0.5**4)


@pytest.mark.parametrize("image", [{**LITE0, "freeze": True}, {**LITE0, "unfreeze": 1}])
def test_a_decay_that_changes_nothing_is_refused(image: dict) -> None:
    with pytest.raises(ConfigError, match=r"^train.layer_decay: 0.5 changes nothing"):
        check_layer_decay(model_with(image), 0.5)
    check_layer_decay(model_with(image), 1.0)
    check_layer_decay(model_with({**LITE0, "unfreeze": 2}), 0.5)


@pytest.mark.parametrize("value", [0, 1.5, -0.1])
def test_layer_decay_out_of_range_is_one_line(tmp_path: Path, value: float, capsys: pytest.CaptureFixture) -> None:
    records = write_dataset(tmp_path, n=12)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(run_config(records, layer_decay=value)))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.layer_decay" in err and "\n" not in err


def test_cli_refuses_layer_decay_with_frozen_encoders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = write_dataset(tmp_path, n=12)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(run_config(records, layer_decay=0.5)))  # tiny_model: frozen
    capsys.readouterr()
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmfuse train: error: train.layer_decay: 0.5 changes nothing") and "\n" not in err


def test_cli_fine_tunes_the_last_blocks_at_decayed_rates(tmp_path: Path) -> None:
    """Through `mmfuse train`: the checkpoint's optimiser holds encoder_lr * 0.5**depth for the two unfrozen
    stages, the frozen blocks keep the weights file's values (BatchNorm statistics included), the others move."""
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    records = write_dataset(tmp_path, n=24)
    cfg = run_config(records, encoder_lr=0.02, layer_decay=0.5, max_epochs=1)
    cfg["model"]["encoders"]["image"].update(freeze=False, unfreeze=2, weights=str(weights))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 0

    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    image = [g for g in ckpt["optimizer_states"][0]["param_groups"] if g.get("modality") == "image"]
    assert sorted(g["initial_lr"] for g in image) == pytest.approx([0.01, 0.02])
    assert not any(
        g.get("modality") == "text" and g["initial_lr"] == 0.02 for g in ckpt["optimizer_states"][0]["param_groups"]
    )

    start = torch.load(weights)
    trained = load_file(str(tmp_path / "run/model.safetensors"))
    for key, value in start.items():
        if key.startswith("fc."):
            continue
        got = trained[f"encoders.image.net.{key}"]
        if key.startswith(("layer3.", "layer4.")) and key.endswith(("weight", "running_mean")):
            assert not torch.equal(got, value), f"{key} was fine-tuned"
        elif not key.startswith(("layer3.", "layer4.")):
            assert torch.equal(got, value), f"{key} is frozen: unchanged, BatchNorm statistics included"
