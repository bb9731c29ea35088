"""Low-rank bilinear pooling: MLB (Kim et al. 2017) and MFB (Yu et al. 2017).

Shapes: B batch, M modalities, D_m feature size of modality m, H pooled size, k factor, D_out fused size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput


@FUSIONS.register("bilinear")
class BilinearFusion(Fusion):
    """Low-rank bilinear pooling of the pooled vectors: MLB (`variant="mlb"`) or MFB (`variant="mfb"`).

    - MLB: `z = tanh(U_1 x_1) * tanh(U_2 x_2)`, (B, H): a rank-H bilinear form with tanh.
    - MFB: `u = U_1 x_1 * U_2 x_2`, (B, H * k), sum-pooled over each run of k consecutive entries to (B, H), then
      power-normalised (`sign(z) * sqrt(|z|)`) and L2-normalised: each entry is a rank-k bilinear form
      `z_h = sum_j (U_1 x_1)_{hk+j} (U_2 x_2)_{hk+j}`.

    `fused = fc_out(z)`. With more than two modalities the Hadamard product runs over all of them (a low-rank
    multilinear form). `extras["pooled"]` holds `z` (B, H) before `fc_out`.

    Args:
        input_dims: {modality: D_m}, at least two modalities.
        output_dim: D_out.
        variant: "mlb" or "mfb".
        hidden_dim: H; defaults to `output_dim`.
        factor: k, the rank of each MFB output entry (MFB only; default 5).
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        variant: str = "mfb",
        hidden_dim: int | None = None,
        factor: int | None = None,
    ) -> None:
        super().__init__(input_dims, output_dim)
        if len(self.modalities) < 2:
            raise ValueError(f"bilinear fuses two or more modalities; got {self.modalities}")
        if variant not in ("mlb", "mfb"):
            raise ValueError(f"bilinear variant must be 'mlb' or 'mfb', got {variant!r}")
        if variant == "mlb" and factor is not None:
            raise ValueError("bilinear factor is an option of variant 'mfb' only (mlb has no factor)")
        if factor is not None and factor < 1:
            raise ValueError(f"bilinear factor must be >= 1, got {factor}")
        self.variant = variant
        self.hidden_dim = output_dim if hidden_dim is None else hidden_dim
        self.factor = 1 if variant == "mlb" else (5 if factor is None else factor)
        width = self.hidden_dim * self.factor
        self.proj = nn.ModuleDict({m: nn.Linear(d, width) for m, d in self.input_dims.items()})
        self.fc_out = nn.Linear(self.hidden_dim, output_dim)

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        projected = [self.proj[m](features[m].pooled) for m in self.modalities]  # each (B, H * k)
        if self.variant == "mlb":
            z = torch.stack([p.tanh() for p in projected]).prod(dim=0)  # (B, H)
        else:
            z = torch.stack(projected).prod(dim=0).unflatten(1, (self.hidden_dim, self.factor)).sum(dim=2)  # (B, H)
            z = F.normalize(signed_sqrt(z), dim=1)
        return FusionOutput(fused=self.fc_out(z), extras={"pooled": z})


def signed_sqrt(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """`sign(z) * sqrt(|z|)` with a finite gradient at 0 (|z| is clamped to `eps` inside the root)."""
    return z.sign() * z.abs().clamp(min=eps).sqrt()
