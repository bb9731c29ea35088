"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018).

Learned task weights w_t (normalised to sum T before every step). With W the last shared layer,

    G_t = |grad_W (w_t L_t)| = w_t |grad_W L_t|,     r_t = (L_t / L_t(0)) / mean_k (L_k / L_k(0))
    L_grad = sum_t | G_t - [mean_k G_k * r_t^alpha] |        (the bracket is a constant)

The network is trained on `sum_t w_t L_t` with the weights held fixed, and the weights only on
L_grad: its gradient is written into `weights.grad` through the same single backward call (a
surrogate term `(weights * dL_grad/dw).sum()`), so the optimiser steps them and DDP averages it.
L_t(0) is the loss of the first step (a buffer, saved in checkpoints).

"Last shared layer": the last parameter of `shared_params` with at least two dimensions (the
weight matrix of the fusion's last layer when the trainer lists encoders then fusion), or the last
parameter if none has two dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmfuse.mtl.base import WEIGHTINGS, Weighting


def last_shared_layer(shared_params: Sequence[nn.Parameter]) -> nn.Parameter | None:
    """The parameter GradNorm measures gradient norms on (see the module docstring)."""
    params = [p for p in shared_params if p.requires_grad]
    matrices = [p for p in params if p.dim() >= 2]
    return matrices[-1] if matrices else (params[-1] if params else None)


@WEIGHTINGS.register("gradnorm")
class GradNorm(Weighting):
    """Learn task weights so that the tasks' gradient norms train at similar relative rates.

    `weights` (T,) is an `nn.Parameter`: the trainer gives it to the optimiser (no weight decay).

    Args:
        tasks: the task names.
        alpha: the restoring force towards a common training rate (1.5 in the paper; 0 equalises norms).
        min_weight: weights are clamped to at least this before renormalising, so they stay positive.
    """

    def __init__(self, tasks: list[str], alpha: float = 1.5, min_weight: float = 1e-3) -> None:
        super().__init__(tasks)
        self.alpha, self.min_weight = alpha, min_weight
        self.weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), float("nan")))

    @torch.no_grad()
    def renormalise(self) -> None:
        """Clamp the weights to `min_weight` and rescale them in place so they sum to T."""
        self.weights.clamp_(min=self.min_weight)
        self.weights.mul_(len(self.tasks) / self.weights.sum())

    def objective(
        self, losses: torch.Tensor, shared_params: Sequence[nn.Parameter]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`sum_t w_t L_t` with the weights held fixed, plus the surrogate that writes dL_grad/dw into
        `weights.grad`; the weights are renormalised first."""
        self.renormalise()
        weight_grad = self.weight_gradient(losses, last_shared_layer(shared_params))
        w = self.weights
        return (w.detach().to(losses) * losses).sum() + (w * weight_grad).sum(), w

    def weight_gradient(self, losses: torch.Tensor, layer: nn.Parameter | None) -> torch.Tensor:
        """dL_grad/dw (T,), detached; zeros when there is no shared layer or no usable initial loss."""
        detached = losses.detach().to(self.initial_losses)
        unset = torch.isnan(self.initial_losses) & (detached > 0)
        self.initial_losses.copy_(torch.where(unset, detached, self.initial_losses))
        if layer is None:
            return torch.zeros_like(self.weights)
        norms = torch.stack([self._grad_norm(loss, layer) for loss in losses]).to(self.weights)  # (T,) |grad_W L_t|
        rates = detached / self.initial_losses
        rates = torch.where(torch.isfinite(rates), rates, torch.ones_like(rates))
        rates = rates / rates.mean().clamp_min(1e-12)  # r_t
        w = self.weights.detach().requires_grad_(True)
        g = w * norms  # G_t
        target = (g.mean() * rates.pow(self.alpha)).detach()
        (grad,) = torch.autograd.grad((g - target).abs().sum(), w)
        return grad.detach()

    @staticmethod
    def _grad_norm(loss: torch.Tensor, layer: nn.Parameter) -> torch.Tensor:
        if not loss.requires_grad:
            return torch.zeros((), device=layer.device)
        (grad,) = torch.autograd.grad(loss, layer, retain_graph=True, allow_unused=True)
        return torch.zeros((), device=layer.device) if grad is None else grad.detach().norm()
