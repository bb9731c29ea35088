"""Multi-task loss weighting; importing this package registers every weighting.

Example:
    >>> from mmfuse.mtl import WEIGHTINGS
    >>> weighting = WEIGHTINGS.get("pcgrad")(tasks=["answer", "color"], seed=0)
    >>> weights = weighting.backward(losses, shared_params, backward=manual_backward)
"""

from mmfuse.mtl import cagrad, dwa, equal, gradnorm, pcgrad, static, uncertainty  # noqa: F401,E402  (registration)
from mmfuse.mtl.base import WEIGHTINGS, GradientWeighting, Weighting, surrogate_backward, task_gradients

__all__ = ["WEIGHTINGS", "GradientWeighting", "Weighting", "surrogate_backward", "task_gradients"]
