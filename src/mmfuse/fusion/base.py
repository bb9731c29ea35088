"""Fusion contract.

Shapes: B batch, D_m feature size of modality m, D_out fused size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.registry import Registry

FUSIONS: Registry[type[Fusion]] = Registry("fusion")


@dataclass
class FusionOutput:
    """What every fusion returns.

    Attributes:
        fused: (B, D_out).
        contributions: per-modality (B, D_out) terms where the fusion decomposes exactly as
            `fused = sum(contributions.values()) + bias` (sum, concat); empty otherwise.
        bias: (D_out,) the part of `fused` that belongs to no modality, or None.
        extras: anything else worth returning (attention weights (B, heads, Q, T), gates, ...).
    """

    fused: torch.Tensor
    contributions: dict[str, torch.Tensor] = field(default_factory=dict)
    bias: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Fusion(nn.Module):
    """Base class of every fusion.

    Subclasses take `input_dims` ({modality: D_m}, read from the built encoders), `output_dim` and
    their own flat options, and implement `forward(features) -> FusionOutput`.
    """

    output_dim: int
    needs_tokens: bool = False  # True when forward reads EncoderOutput.tokens

    def __init__(self, input_dims: dict[str, int], output_dim: int) -> None:
        super().__init__()
        if len(input_dims) < 1:
            raise ValueError("a fusion needs at least one modality")
        self.input_dims = dict(input_dims)
        self.modalities = list(input_dims)
        self.output_dim = output_dim

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        raise NotImplementedError
