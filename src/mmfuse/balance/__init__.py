"""Modality balancing, one file per method; each module is imported (and registers its balancer) when its
name is first asked for (`mmfuse.registry`).

Adding a balancer is one file here (or in `$MMFUSE_PLUGINS/balance/`): a subclass of `Balancer` registered
with `@BALANCERS.register("name")`; tests/balance/test_balancer_contract.py covers it from then on.

Example:
    >>> from mmfuse.balance import BALANCERS
    >>> balancer = BALANCERS.get("ogm_ge")(modalities=["image", "text"], alpha=0.1)
    >>> balancer.setup(model)  # once, before the optimiser is created
"""

from mmfuse.balance.base import BALANCERS, Balancer, decompose_logits, linear_head, modality_parameters
from mmfuse.registry import import_modules

import_modules(__name__, __path__)

__all__ = ["BALANCERS", "Balancer", "decompose_logits", "linear_head", "modality_parameters"]
