"""Gated fusion (Kiela et al. 2018): one modality gates the other's projection.

Shapes: B batch, D_m feature size of modality m, H hidden size, D_out fused size.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput


@FUSIONS.register("gated")
class GatedFusion(Fusion):
    """`fc_out(sigmoid(fc_g(x_g)) * fc_o(x_o))`: the gating modality `g` scales the other modality `o`.

    Exactly two modalities. The gate (B, H) is returned in `extras["gate"]`.

    Args:
        input_dims: {modality: D_m}, two modalities.
        output_dim: D_out.
        gate_on: the gating modality.
        hidden_dim: H, the size both modalities are projected to; defaults to `output_dim`.
    """

    def __init__(
        self, input_dims: dict[str, int], output_dim: int, gate_on: str = "image", hidden_dim: int | None = None
    ) -> None:
        super().__init__(input_dims, output_dim)
        self.gated = self.other_modality("gated", gate_on, "gate_on", "gates on")
        self.gate_on = gate_on
        self.hidden_dim = output_dim if hidden_dim is None else hidden_dim
        self.fc = nn.ModuleDict({m: nn.Linear(d, self.hidden_dim) for m, d in self.input_dims.items()})
        self.fc_out = nn.Linear(self.hidden_dim, output_dim)

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        gate = torch.sigmoid(self.fc[self.gate_on](features[self.gate_on].pooled))  # (B, H)
        value = self.fc[self.gated](features[self.gated].pooled)  # (B, H)
        fused = self.fc_out(gate * value)  # (B, D_out)
        return FusionOutput(fused=fused, extras={"gate": gate})
