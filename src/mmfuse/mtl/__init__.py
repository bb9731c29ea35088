"""Multi-task loss weighting, one file per method; each module is imported (and registers its weighting) when its
name is first asked for (`mmfuse.registry`).

Adding a weighting is one file here (or in `$MMFUSE_PLUGINS/mtl/`): a subclass of `Weighting` registered with
`@WEIGHTINGS.register("name")`; tests/mtl/test_registry.py covers it from then on.

Example:
    >>> from mmfuse.mtl import WEIGHTINGS
    >>> weighting = WEIGHTINGS.get("pcgrad")(tasks=["answer", "color"], seed=0)
    >>> weights = weighting.backward(losses, shared_params, backward=manual_backward)
"""

from mmfuse.mtl.base import WEIGHTINGS, GradientWeighting, Weighting, surrogate_backward, task_gradients
from mmfuse.registry import import_modules

import_modules(__name__, __path__)

__all__ = ["WEIGHTINGS", "GradientWeighting", "Weighting", "surrogate_backward", "task_gradients"]
