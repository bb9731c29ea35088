"""PCGrad: gradient surgery for multi-task learning (Yu et al., NeurIPS 2020).

Two gradients conflict when g_i . g_j < 0 (negative cosine similarity, the paper's definition).
With two tasks, the projected gradients conflict with no task any more (g_1' . g_2 = 0 when g_1 and
g_2 conflicted); with more, each projection removes the conflict with the task it projects off at
that moment, but a later projection can bring back a conflict with a task visited earlier when those
two tasks conflict with each other (Algorithm 1 of the paper behaves so too; its convergence
analysis is for two tasks).

Shapes: T tasks, P shared parameter elements.
"""

from __future__ import annotations

import torch

from mmfuse.mtl.base import WEIGHTINGS, GradientWeighting


def pcgrad_projections(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad's projection of each task's gradient: (T, P) -> (T, P).

    For each task i, the other tasks are visited in a random order; whenever the (already projected)
    g_i conflicts with the original g_j (g_i . g_j < 0), g_i loses its component along g_j:
    `g_i <- g_i - (g_i . g_j) / |g_j|^2 g_j`. Non-conflicting gradients are left as they are.
    """
    t = grads.shape[0]
    projected = grads.clone()
    norms_sq = (grads * grads).sum(1)  # (T,)
    for i in range(t):
        g_i = projected[i]
        for j in torch.randperm(t, generator=generator).tolist():
            if j == i or norms_sq[j] == 0:
                continue
            dot = torch.dot(g_i, grads[j])
            if dot < 0:
                g_i = g_i - dot / norms_sq[j] * grads[j]
        projected[i] = g_i
    return projected


def project_conflicting(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The PCGrad update: the sum of the projected gradients (P,) from the per-task gradients (T, P)."""
    return pcgrad_projections(grads, generator).sum(0)


@WEIGHTINGS.register("pcgrad")
class PCGrad(GradientWeighting):
    """Project each task's shared gradient off the gradients it conflicts with, then sum.

    Only the shared parameters (encoders + fusion) are operated on; task heads get their ordinary gradients.
    The projection uses the local (per-device) gradients; under DDP the resulting g* is then averaged once.

    Args:
        tasks: the task names.
        seed: seeds the random task order (None: torch's global RNG).
    """

    def __init__(self, tasks: list[str], seed: int | None = None) -> None:
        super().__init__(tasks)
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    def combine(self, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return project_conflicting(grads, self.generator), torch.ones(grads.shape[0])
