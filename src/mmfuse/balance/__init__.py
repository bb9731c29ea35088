"""Modality balancing; importing this package registers every balancer.

Example:
    >>> from mmfuse.balance import BALANCERS
    >>> balancer = BALANCERS.get("ogm_ge")(modalities=["image", "text"], alpha=0.1)
    >>> balancer.setup(model)  # once, before the optimiser is created
"""

from mmfuse.balance import agm, modality_dropout, ogm_ge  # noqa: F401,E402  (registration)
from mmfuse.balance.base import BALANCERS, Balancer, decompose_logits, linear_head, modality_parameters

__all__ = ["BALANCERS", "Balancer", "decompose_logits", "linear_head", "modality_parameters"]
