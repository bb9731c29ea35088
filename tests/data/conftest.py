"""Shared fixtures of the data tests: tiny image files, records files and one task of each kind."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmfuse.data import Schema
from mmfuse.encoders import Encoder
from mmfuse.encoders.hf_text import HFTextEncoder
from mmfuse.encoders.torchvision_image import TorchvisionImageEncoder
from mmfuse.tasks import Task, build_task

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
LABELS = ["label", "flag", "tags", "score"]


@pytest.fixture(scope="session")
def encoders() -> dict[str, Encoder]:
    """A tiny image encoder (8x8 inputs) and a tiny text encoder; the data tests use their data side."""
    return {
        "image": TorchvisionImageEncoder("resnet18", image_size=8),
        "text": HFTextEncoder(config=TINY_BERT, max_length=64),
    }


@pytest.fixture(scope="session")
def make_schema(encoders: dict[str, Encoder]) -> Callable[..., Schema]:
    """make_schema(labels=LABELS, modalities=("image", "text"), **kwargs) -> Schema."""

    def make(labels: Any = LABELS, modalities: tuple[str, ...] = ("image", "text"), **kwargs: Any) -> Schema:
        labels = labels if isinstance(labels, dict) else {n: n for n in labels}
        return Schema({m: encoders[m] for m in modalities}, labels=labels, **kwargs)

    return make


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """make_image("a.png", mode="RGB", size=(12, 10)) writes a real image file under tmp_path.

    With truncate=True it writes a 64x64 noise image and keeps the first 60% of its bytes: the header
    still opens, only decoding the pixels fails (the case that `Image.open` alone would miss).
    """

    def make(name: str, mode: str = "RGB", size: tuple[int, int] = (12, 10), truncate: bool = False) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        bands = Image.getmodebands(mode)
        color: Any = 128 if bands == 1 else tuple(range(40, 40 + 40 * bands, 40))
        image = Image.effect_noise((64, 64), 60).convert(mode) if truncate else Image.new(mode, size, color)
        image.save(path)
        if truncate:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) * 6 // 10])
        return path

    return make


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[[str, list[Any]], Path]:
    """write_jsonl("r.jsonl", rows): a dict row is dumped as JSON, a str row written as is."""

    def write(name: str, rows: list[Any]) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[[str, list[list[str]]], Path]:
    """write_csv("r.csv", [header, *rows])."""

    def write(name: str, rows: list[list[str]]) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            csv.writer(handle).writerows(rows)
        return path

    return write


@pytest.fixture
def tasks() -> dict[str, Task]:
    """One task of each kind: label (multiclass), flag (binary), tags (multilabel), score (regression)."""
    return {
        "label": build_task("label", "multiclass", classes=["cat", "dog", "fox"]),
        "flag": build_task("flag", "binary"),
        "tags": build_task("tags", "multilabel", classes=["a", "b", "c", "d"]),
        "score": build_task("score", "regression"),
    }
