"""Sum fusion: project every modality to the output size and add.

Shapes: B batch, D_m feature size of modality m, D_out fused size.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput


@FUSIONS.register("sum")
class SumFusion(Fusion):
    """Project each modality to the output size and add: `sum_m (W_m x_m + b_m)`.

    Works for any number of modalities. Each modality's projection (its bias included) is returned as its
    contribution, so `fused == sum(contributions.values())` and `bias` is None.

    Args:
        input_dims: {modality: D_m}.
        output_dim: D_out.
    """

    def __init__(self, input_dims: dict[str, int], output_dim: int) -> None:
        super().__init__(input_dims, output_dim)
        self.fc = nn.ModuleDict({m: nn.Linear(d, output_dim) for m, d in self.input_dims.items()})

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        contributions = {m: self.fc[m](features[m].pooled) for m in self.modalities}  # each (B, D_out)
        fused: torch.Tensor = sum(contributions.values())  # type: ignore[assignment]
        return FusionOutput(fused=fused, contributions=contributions)
