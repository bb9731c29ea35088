"""Encoder test fixtures: tiny images, a tiny BERT config, sample sentences.

Models are built with random weights at 64x64 unless a test is about the packaged weights (marked slow).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

IMAGE_SIZE = 64
TINY_BERT: dict[str, Any] = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "vocab_size": 30522,  # the MiniLM tokenizer's size: the default tokenizer of a config-built model
}


def make_images(n: int = 2) -> list[Image.Image]:
    """`n` random images of different sizes and modes (RGB, grayscale), so preprocessing must unify them."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        h, w = 48 + 8 * i, 80 - 8 * i
        array = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        image = Image.fromarray(array)
        images.append(image.convert("L") if i % 2 else image)
    return images


@pytest.fixture
def images() -> list[Image.Image]:
    return make_images()


@pytest.fixture
def tiny_bert() -> dict[str, Any]:
    return dict(TINY_BERT)


@pytest.fixture
def sentences() -> list[str]:
    return ["a red circle", "what shape is on the left of the big blue square?"]
