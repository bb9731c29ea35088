"""Low-rank multimodal fusion (LMF, Liu et al. 2018): tensor fusion with a rank-r CP-factored weight tensor.

Shapes: B batch, M modalities, D_m feature size of modality m, d projected size, r rank, D_out fused size.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput
from mmfuse.fusion.tensor import augmented_projections


@FUSIONS.register("lmf")
class LowRankFusion(Fusion):
    """Low-rank tensor fusion (LMF): `fused_o = sum_r prod_m ([h_m, 1] . factors_m[r, :, o]) + bias_o`.

    `h_m = proj_m(x_m)`, as in `tensor`.

    This is `tensor` fusion whose weight tensor `W[o, a_1, ..., a_M]` is constrained to the rank-r CP form
    `sum_r prod_m factors_m[r, a_m, o]`, computed without ever building the outer product; at rank
    `(d + 1)^(M - 1)` it can express any `tensor` fusion exactly. (The paper's extra per-rank weights are left
    out: they fold into the factors.)

    Args:
        input_dims: {modality: D_m}, two or more modalities.
        output_dim: D_out.
        hidden_dim: d, the size each modality is projected to.
        rank: r.
    """

    def __init__(self, input_dims: dict[str, int], output_dim: int, hidden_dim: int = 16, rank: int = 4) -> None:
        super().__init__(input_dims, output_dim)
        if len(self.modalities) < 2:
            raise ValueError(f"lmf fuses two or more modalities; got {self.modalities}")
        if rank < 1:
            raise ValueError(f"lmf rank must be >= 1, got {rank}")
        self.hidden_dim, self.rank = hidden_dim, rank
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden_dim) for m, d in self.input_dims.items()})
        self.factors = nn.ParameterDict(
            {m: nn.Parameter(torch.empty(rank, hidden_dim + 1, output_dim)) for m in self.modalities}
        )
        self.bias = nn.Parameter(torch.zeros(output_dim))
        # Each factor's output has variance ~1 / r^(1/M), so the sum over r of M-fold products starts near unit scale.
        std = ((hidden_dim + 1) * rank ** (1 / len(self.modalities))) ** -0.5
        for factor in self.factors.values():
            nn.init.normal_(factor, std=std)

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        z = augmented_projections(self.proj, features)  # M x (B, d + 1)
        product = None
        for m, z_m in zip(self.modalities, z, strict=True):
            term = torch.einsum("ba,rao->bro", z_m, self.factors[m])  # (B, r, D_out)
            product = term if product is None else product * term
        return FusionOutput(fused=product.sum(dim=1) + self.bias)  # (B, D_out)
