"""Fusion modules; importing this package registers them all."""

from mmfuse.fusion import bilinear, co_attention, concat, cross_attention, film, gated, lmf, sum, tensor  # noqa: F401,E402  (registration)
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput

__all__ = ["FUSIONS", "Fusion", "FusionOutput"]
