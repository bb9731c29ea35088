"""Static weighting: fixed, user-given weight per task."""

from __future__ import annotations

import torch

from mmfuse.mtl.base import WEIGHTINGS, Weighting


@WEIGHTINGS.register("static")
class StaticWeighting(Weighting):
    """Backward `sum_t w_t L_t` with fixed weights from the config.

    Args:
        tasks: the task names.
        weights: {task: weight}; tasks left out weigh 1.0. A name that is not a task is an error.

    Example:
        >>> StaticWeighting(["answer", "color"], weights={"color": 0.3})
    """

    def __init__(self, tasks: list[str], weights: dict[str, float] | None = None) -> None:
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"static weighting: unknown task(s) {unknown} in weights; tasks are {self.tasks}")
        negative = sorted(t for t, w in weights.items() if w < 0)
        if negative:
            raise ValueError(f"static weighting: negative weight for task(s) {negative}")
        self.register_buffer("weights", torch.tensor([float(weights.get(t, 1.0)) for t in self.tasks]))

    def weigh(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights.to(losses)
        return (w * losses).sum(), w
