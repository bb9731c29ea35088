"""Concat fusion: concatenate the modalities, then one linear layer.

Shapes: B batch, D_m feature size of modality m, D_out fused size.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput, identity_linear


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
    """Concatenate the pooled features (in `input_dims` order) and apply one linear layer.

    Works for any number of modalities. The layer splits exactly into per-modality column blocks:
    `fused == sum_m x_m @ W[:, block_m].T + b`, returned as `contributions` and `bias`.

    With `adapters`, each modality first passes through its own `nn.Linear(D_m, D_m)` (identity at
    initialisation): parameters that belong to one modality alone, so a modality balancer can act on them when
    the encoders are frozen (the column blocks of one shared layer cannot get a learning rate of their own).

    Args:
        input_dims: {modality: D_m}; their order is the concatenation order.
        output_dim: D_out.
        adapters: add the per-modality adapters.
    """

    def __init__(self, input_dims: dict[str, int], output_dim: int, adapters: bool = False) -> None:
        super().__init__(input_dims, output_dim)
        self.adapter = nn.ModuleDict({m: identity_linear(d) for m, d in self.input_dims.items()}) if adapters else None
        self.fc_out = nn.Linear(sum(self.input_dims.values()), output_dim)

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        xs = [features[m].pooled for m in self.modalities]  # each (B, D_m)
        if self.adapter is not None:
            xs = [self.adapter[m](x) for m, x in zip(self.modalities, xs)]  # each (B, D_m)
        fused = self.fc_out(torch.cat(xs, dim=1))  # (B, sum D_m) -> (B, D_out)
        blocks = self.fc_out.weight.split(list(self.input_dims.values()), dim=1)  # each (D_out, D_m)
        contributions = {m: x @ w.T for m, x, w in zip(self.modalities, xs, blocks)}  # each (B, D_out)
        return FusionOutput(fused=fused, contributions=contributions, bias=self.fc_out.bias)
