"""Fusion modules; importing this package registers them all."""

from mmfuse.fusion import (  # noqa: F401,E402  (registration)
    bilinear,
    co_attention,
    concat,
    cross_attention,
    film,
    gated,
    lmf,
    relation,
    spatial_film,
    sum,
    tensor,
)
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput

__all__ = ["FUSIONS", "Fusion", "FusionOutput"]
