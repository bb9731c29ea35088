"""Equal weighting: every task loss counts once."""

from __future__ import annotations

import torch

from mmfuse.mtl.base import WEIGHTINGS, Weighting


@WEIGHTINGS.register("equal")
class EqualWeighting(Weighting):
    """Backward the plain sum of the task losses (every weight is 1).

    Args:
        tasks: the task names.
    """

    def weigh(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return losses.sum(), torch.ones_like(losses)  # a new tensor: never requires grad
