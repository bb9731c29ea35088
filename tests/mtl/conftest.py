"""Weighting test fixtures: a tiny two-task model (shared trunk, one head per task) and its losses.

Shapes: B = 6 samples, 4 inputs, 3 shared features; task "a" has 3 classes, task "b" is a regression.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

TASKS = ["a", "b"]


@dataclass
class TwoTask:
    shared: nn.Module
    heads: nn.ModuleDict
    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor

    def shared_params(self) -> list[nn.Parameter]:
        return list(self.shared.parameters())

    def losses(self) -> dict[str, torch.Tensor]:
        z = self.shared(self.x)  # (B, 3)
        return {
            "a": F.cross_entropy(self.heads["a"](z), self.y_a),
            "b": F.mse_loss(self.heads["b"](z).squeeze(-1), self.y_b),
        }

    def zero_grad(self) -> None:
        for p in [*self.shared.parameters(), *self.heads.parameters()]:
            p.grad = None


def make_two_task() -> TwoTask:
    shared = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    heads = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 1)})
    x = torch.randn(6, 4)
    return TwoTask(shared, heads, x, torch.randint(0, 3, (6,)), torch.randn(6) * 3)


@pytest.fixture
def two_task(seed: int) -> TwoTask:
    return make_two_task()


@pytest.fixture
def tasks() -> list[str]:
    return list(TASKS)


class CountingBackward:
    """A `backward` callable that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, loss: torch.Tensor) -> None:
        self.calls += 1
        loss.backward()


@pytest.fixture
def counting_backward() -> Callable[[], CountingBackward]:
    return CountingBackward
