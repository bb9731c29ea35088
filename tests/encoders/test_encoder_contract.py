"""Every registered encoder, built tiny with random weights, honours the Encoder contract."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mmfuse.encoders import ENCODERS, Encoder

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "vocab_size": 30522,
}
# One tiny, random-weight recipe per registered encoder: registering an encoder without one fails below.
RECIPES: dict[str, dict[str, Any]] = {
    "torchvision": {"model": "resnet18", "image_size": 32, "tokens": True},
    "timm": {"model": "resnet18", "weights": None, "image_size": 32, "tokens": True},
    "hf_text": {"config": TINY_BERT},
}


def raw_inputs(modality: str) -> list[Any]:
    if modality == "text":
        return ["a small red circle", "blue"]
    return [torch.randint(0, 256, (40, 56, 3), dtype=torch.uint8).numpy() for _ in range(2)]


def build(name: str, **overrides: Any) -> Encoder:
    return ENCODERS.get(name)(**{**RECIPES[name], **overrides})


def run(encoder: Encoder) -> Any:
    return encoder(encoder.collate([encoder.preprocess(x) for x in raw_inputs(encoder.modality)]))


def test_every_encoder_has_a_recipe() -> None:
    assert set(ENCODERS.names()) <= set(RECIPES), "add a tiny recipe for each new encoder"


@pytest.fixture(params=sorted(RECIPES))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_shapes_and_output_dim(name: str, seed: int) -> None:
    encoder = build(name)
    assert encoder.modality in ("image", "text")
    out = run(encoder)
    assert out.pooled.shape == (2, encoder.output_dim)
    assert out.tokens is not None and out.tokens.shape[0] == 2 and out.tokens.shape[-1] == encoder.output_dim
    if out.mask is not None:
        assert out.mask.dtype == torch.bool and out.mask.shape == out.tokens.shape[:2]


def test_gradient_reaches_every_used_parameter(name: str, seed: int) -> None:
    encoder = build(name)
    run(encoder).pooled.sum().backward()
    # the BERT pooler only feeds pooling="pooler"
    missing = [n for n, p in encoder.named_parameters() if p.grad is None and "pooler" not in n]
    assert not missing


def test_eval_is_deterministic(name: str, seed: int) -> None:
    encoder = build(name).eval()
    batch = encoder.collate([encoder.preprocess(x) for x in raw_inputs(encoder.modality)])
    with torch.no_grad():
        torch.testing.assert_close(encoder(batch).pooled, encoder(batch).pooled, rtol=0, atol=0)


def test_freeze(name: str, seed: int) -> None:
    encoder = build(name, freeze=True)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not any(m.training for m in encoder.modules())
    assert build(name).training  # unfrozen encoders follow train()/eval() as usual


def test_cache_key_is_stable(name: str, seed: int) -> None:
    encoder = build(name)
    key = encoder.cache_key()
    assert isinstance(key, str) and key == encoder.cache_key()
    assert type(encoder).__name__ in key
