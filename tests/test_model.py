import pytest
import torch
from PIL import Image

from mmfuse import build_model
from mmfuse.encoders.hf_text import HFTextEncoder
from mmfuse.encoders.torchvision_image import TorchvisionImageEncoder
from mmfuse.fusion.film import FiLMFusion
from mmfuse.model import MultiTaskModel
from mmfuse.tasks import build_task
from tiny import TINY_BERT, tiny_model

TASKS = {
    "kind3": {"kind": "multiclass", "classes": ["a", "b", "c"]},
    "flag": {"kind": "binary"},
    "score": {"kind": "regression"},
    "tags": {"kind": "multilabel", "classes": ["x", "y"]},
}


def batch(model: MultiTaskModel, n: int = 3) -> dict:
    img, txt = model.encoders["image"], model.encoders["text"]
    images = [Image.new("RGB", (20 + i, 30), (40 * i, 10, 200)) for i in range(n)]
    texts = ["a short text", "a somewhat longer text than the first one", "x"][:n]
    return {"image": img.collate([img.preprocess(i) for i in images]), "text": txt.collate(texts)}


def test_build_model_from_a_dict_gives_one_head_per_task(seed: int) -> None:
    model = build_model({"model": tiny_model(fusion="gated"), "tasks": TASKS})
    out = model(batch(model))
    assert {k: tuple(v.shape) for k, v in out.logits.items()} == {
        "kind3": (3, 3),
        "flag": (3, 1),
        "score": (3, 1),
        "tags": (3, 2),
    }
    assert isinstance(model.heads, torch.nn.ModuleDict) and out.fusion.fused.shape == (3, 16)


def test_composition_by_hand_without_config(seed: int) -> None:
    img = TorchvisionImageEncoder("resnet18", image_size=32)
    txt = HFTextEncoder(config=TINY_BERT, pooling="cls")
    fusion = FiLMFusion({"image": img.output_dim, "text": txt.output_dim}, output_dim=24, condition_on="text")
    model = MultiTaskModel({"image": img, "text": txt}, fusion, {"y": build_task("y", "binary")})
    out = model(batch(model, 2))
    assert out.logits["y"].shape == (2, 1)
    losses = model.losses(out.logits, {"y": torch.tensor([0.0, 1.0])}, {"y": torch.tensor([True, True])})
    losses["y"].backward()
    assert img.net.conv1.weight.grad is not None and txt.model.embeddings.word_embeddings.weight.grad is not None


def test_sizes_are_read_from_the_built_encoders() -> None:
    """The notebook bug (1000-d logits instead of 2048-d features, a hard-coded Linear(1768, 1)) cannot happen."""
    model = build_model(
        {
            "model": {
                **tiny_model(),
                "encoders": {
                    "image": {"name": "torchvision", "model": "resnet50", "image_size": 32},
                    "text": {"name": "hf_text", "config": TINY_BERT},
                },
            },
            "tasks": {"y": {"kind": "binary"}},
        }
    )
    assert model.fusion.input_dims == {"image": 2048, "text": 32}


def test_fusion_and_encoder_sizes_must_agree() -> None:
    img = TorchvisionImageEncoder("resnet18", image_size=32)
    fusion = FiLMFusion({"image": 2048, "text": 32}, output_dim=8)
    with pytest.raises(ValueError, match="fusion expects input sizes"):
        MultiTaskModel(
            {"image": img, "text": HFTextEncoder(config=TINY_BERT)}, fusion, {"y": build_task("y", "binary")}
        )


def test_absent_modality_gives_exact_zeros_and_leaves_other_samples(seed: int) -> None:
    model = build_model({"model": tiny_model(), "tasks": TASKS}).eval()
    inputs = batch(model)
    absent = {"text": torch.tensor([False, True, False])}
    full, part = model(inputs), model(inputs, absent=absent)
    assert torch.equal(part.features["text"].pooled[1], torch.zeros(32))
    assert torch.allclose(part.fusion.fused[[0, 2]], full.fusion.fused[[0, 2]])
    assert not torch.allclose(part.fusion.fused[1], full.fusion.fused[1])


def test_given_features_skip_the_encoder(seed: int) -> None:
    model = build_model({"model": tiny_model(), "tasks": TASKS}).eval()
    inputs = batch(model)
    feats = model.encode(inputs)
    out = model({}, features=feats)
    assert torch.allclose(out.logits["kind3"], model(inputs).logits["kind3"])


@pytest.mark.parametrize("fusion", ["cross_attention", "co_attention"])
def test_the_spatial_grid_is_asked_of_the_encoders_not_read_off_a_name(fusion: str) -> None:
    image = {"name": "torchvision", "model": "resnet18", "image_size": 64, "freeze": True, "tokens": True}
    text = {"name": "hf_text", "config": TINY_BERT, "max_length": 16, "freeze": True}
    extra = {"direction": "caption_to_photo"} if fusion == "cross_attention" else {}
    model = build_model(
        {
            "model": {
                "encoders": {"photo": image, "caption": text},
                "fusion": {"name": fusion, "output_dim": 16, **extra},
            },
            "tasks": {"flag": {"kind": "binary"}},
        }
    )
    assert model.fusion.spatial == "photo"  # the image encoder that gives tokens, whatever its modality's name
    pooled = build_model(
        {
            "model": {
                "encoders": {"image": {**image, "tokens": False}, "text": text},
                "fusion": {"name": "cross_attention", "output_dim": 16, "direction": "image_to_text"},
            },
            "tasks": {"flag": {"kind": "binary"}},
        }
    )
    assert pooled.fusion.spatial is None  # called "image", but its encoder gives no grid of tokens
