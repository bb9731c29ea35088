"""Dynamic Weight Average (Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019).

Weights for epoch e, from the epoch-mean losses of the two previous epochs:

    r_t = L_t(e-1) / L_t(e-2),    w_t = T * exp(r_t / temp) / sum_k exp(r_k / temp)

so the weights sum to T, and a task whose loss falls slower gets more weight. Epochs 0 and 1 use
w = 1. A task with no mean loss for one of those epochs (no labelled sample) gets r_t = 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mmfuse.mtl.base import WEIGHTINGS, Weighting


@WEIGHTINGS.register("dwa")
class DynamicWeightAverage(Weighting):
    """Backward `sum_t w_t L_t` with weights set once per epoch from the loss descent rates.

    The loss history and the current weights are buffers, so they are saved in checkpoints.

    Args:
        tasks: the task names.
        temperature: the softmax temperature (2 in the paper); larger gives more even weights.
    """

    def __init__(self, tasks: list[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        if temperature <= 0:
            raise ValueError(f"dwa: temperature must be positive, got {temperature}")
        self.temperature = temperature
        t = len(self.tasks)
        self.register_buffer("history", torch.full((2, t), float("nan")))  # rows: L(e-2), L(e-1)
        self.register_buffer("weights", torch.ones(t))

    def weigh(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights.to(losses)
        return (w * losses).sum(), w

    def on_epoch_end(self, epoch: int, losses: Mapping[str, float]) -> None:
        latest = torch.tensor([float(losses.get(t, float("nan"))) for t in self.tasks], device=self.history.device)
        self.history.copy_(torch.stack([self.history[1], latest]))
        self.weights.copy_(self.compute_weights(self.history[0], self.history[1]))

    def compute_weights(self, before: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(T,) weights from the mean losses of epochs e-2 (`before`) and e-1 (`last`); ones if e-2 is unknown."""
        if bool(torch.isnan(before).all()):
            return torch.ones_like(last)
        ratio = last / before
        ratio = torch.where(torch.isfinite(ratio) & (before > 0), ratio, torch.ones_like(ratio))
        return len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)
