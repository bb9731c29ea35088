"""Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

Each task has a learned log-variance s_t = log sigma_t^2 and the backwarded loss is

    sum_t exp(-s_t) * L_t + s_t

The same form is used for every task kind (as in most reimplementations). For regression it is
exactly twice the paper's objective 1/(2 sigma^2) L + log sigma, so it has the same optimum; for the
paper's classification approximation 1/sigma^2 L + log sigma (= exp(-s) L + s/2) the optimum weight
differs by a constant factor of 2 only. For a constant loss L the minimum over s is at s = log L,
i.e. the weight exp(-s) = 1/L.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.mtl.base import WEIGHTINGS, Weighting


@WEIGHTINGS.register("uncertainty")
class UncertaintyWeighting(Weighting):
    """Learned homoscedastic-uncertainty weights: backward `sum_t exp(-s_t) L_t + s_t`.

    `log_vars` (T,) is an `nn.Parameter`: the trainer must give it to the optimiser (no weight decay).

    Args:
        tasks: the task names.
        init_log_var: the initial s_t (0 gives weight 1).
    """

    def __init__(self, tasks: list[str], init_log_var: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init_log_var)))

    def weigh(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.log_vars.to(losses.dtype)
        precision = torch.exp(-s)  # (T,)
        return (precision * losses + s).sum(), precision.detach()
