"""Balancer test fixtures: a tiny two-modality, two-task MultiTaskModel built on fake encoders.

Shapes: B = 8; image inputs (B, 6) -> 5-d features, text inputs (B, 4) -> 3-d features (unequal on
purpose); fused size 4; task "answer" multiclass with 3 classes, task "flag" binary.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from mmfuse.encoders.base import Encoder, EncoderOutput
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput
from mmfuse.fusion.concat import ConcatFusion
from mmfuse.model import MultiTaskModel
from mmfuse.tasks import BinaryTask, MLPHead, MulticlassTask

B = 8
INPUTS = {"image": 6, "text": 4}
FEATURES = {"image": 5, "text": 3}


class FakeEncoder(Encoder):
    """Linear + LayerNorm over an input tensor: a 2-d weight and 1-d LayerNorm parameters to modulate."""

    def __init__(self, modality: str, input_dim: int, output_dim: int, freeze: bool = False) -> None:
        super().__init__(freeze)
        self.modality, self.output_dim = modality, output_dim
        self.proj = nn.Linear(input_dim, output_dim)
        self.norm = nn.LayerNorm(output_dim)
        self.finish_init()

    def forward(self, inputs: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(pooled=self.norm(self.proj(inputs)))


class OpaqueFusion(Fusion):
    """A fusion that does not decompose per modality (returns no contributions)."""

    def __init__(self, input_dims: dict[str, int], output_dim: int) -> None:
        super().__init__(input_dims, output_dim)
        self.fc = nn.Linear(sum(input_dims.values()), output_dim)

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        return FusionOutput(fused=torch.tanh(self.fc(torch.cat([features[m].pooled for m in self.modalities], 1))))


def make_model(
    fusion: str = "concat", hidden: list[int] | None = None, dropout: float = 0.0, freeze=(), **fusion_opts
) -> MultiTaskModel:
    encoders = {m: FakeEncoder(m, INPUTS[m], FEATURES[m], freeze=m in freeze) for m in INPUTS}
    fusions = {"concat": ConcatFusion, "opaque": OpaqueFusion}
    fuse = (FUSIONS.get(fusion) if fusion not in fusions else fusions[fusion])(dict(FEATURES), 4, **fusion_opts)
    tasks = {"answer": MulticlassTask("answer", ["x", "y", "z"]), "flag": BinaryTask("flag")}
    heads = {n: MLPHead(4, t.out_dim, hidden, dropout) for n, t in tasks.items()}
    return MultiTaskModel(encoders, fuse, tasks, heads)


def make_batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    inputs = {m: torch.randn(B, d) for m, d in INPUTS.items()}
    labels = {"answer": torch.randint(0, 3, (B,)), "flag": torch.randint(0, 2, (B,)).float()}
    masks = {"answer": torch.ones(B, dtype=torch.bool), "flag": torch.arange(B) % 2 == 0}
    return inputs, labels, masks


@pytest.fixture
def model_factory(seed: int) -> Callable[..., MultiTaskModel]:
    return make_model


@pytest.fixture
def batch(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return make_batch()
