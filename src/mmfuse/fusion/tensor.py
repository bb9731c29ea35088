"""Tensor fusion (TFN, Zadeh et al. 2017): a linear map of the outer product of the `[h_m, 1]` vectors.

Shapes: B batch, M modalities, D_m feature size of modality m, d projected size, P = (d + 1)^M outer-product
size, D_out fused size.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput


@FUSIONS.register("tensor")
class TensorFusion(Fusion):
    """Tensor fusion (TFN): `fc_out(flatten([h_1, 1] ⊗ [h_2, 1] ⊗ ...))` with `h_m = proj_m(x_m)`.

    The appended 1 keeps every lower-order term in the product: for two modalities the (d + 1)^2 entries hold
    the bimodal `h_1 h_2^T`, both unimodal `h_1`, `h_2` and a constant 1. The outer product is flattened in
    `input_dims` order (the last modality varies fastest), so `fc_out.weight` viewed as (D_out, d + 1, ..., d + 1)
    is the fusion's weight tensor. Each modality is first projected to `hidden_dim` to keep P small.

    Args:
        input_dims: {modality: D_m}, two or more modalities.
        output_dim: D_out.
        hidden_dim: d, the size each modality is projected to.
    """

    def __init__(self, input_dims: dict[str, int], output_dim: int, hidden_dim: int = 16) -> None:
        super().__init__(input_dims, output_dim)
        if len(self.modalities) < 2:
            raise ValueError(f"tensor fuses two or more modalities; got {self.modalities}")
        self.hidden_dim = hidden_dim
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden_dim) for m, d in self.input_dims.items()})
        self.fc_out = nn.Linear((hidden_dim + 1) ** len(self.modalities), output_dim)

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        z = augmented_projections(self.proj, features)  # M x (B, d + 1)
        outer = z[0]
        for z_m in z[1:]:
            outer = (outer.unsqueeze(2) * z_m.unsqueeze(1)).flatten(1)  # (B, P_so_far * (d + 1))
        return FusionOutput(fused=self.fc_out(outer))  # (B, D_out)


def augmented_projections(proj: nn.ModuleDict, features: dict[str, EncoderOutput]) -> list[torch.Tensor]:
    """`[proj_m(x_m), 1]` (B, d + 1) for each modality of `proj`, in its order."""
    out = []
    for m, layer in proj.items():
        h = layer(features[m].pooled)  # (B, d)
        out.append(torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1))
    return out
