"""FiLM fusion (Perez et al. 2017): one modality predicts a feature-wise affine map of the other.

Shapes: B batch, D_c conditioning size, D_t target size, H hidden size, D_out fused size.
"""

from __future__ import annotations

from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput, identity_linear


@FUSIONS.register("film")
class FiLMFusion(Fusion):
    """`fc_out(gamma * target + beta)` with `gamma, beta = split(fc(condition))`.

    The target is projected to the hidden size by a linear layer when its size differs (identity otherwise),
    so conditioning and target sizes may differ. Exactly two modalities. With `adapters` the target always gets
    its own linear projection (identity at initialisation when the sizes match), so both modalities own
    parameters a modality balancer can act on (`fc` belongs to the conditioning modality, `target_proj` to the
    target).

    Args:
        input_dims: {modality: D_m}, two modalities.
        output_dim: D_out.
        condition_on: the modality that predicts `(gamma, beta)`; the other one is modulated.
        hidden_dim: H, the size `gamma`, `beta` and the target live in; defaults to `output_dim`.
        adapters: always give the target a projection of its own.
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        condition_on: str = "text",
        hidden_dim: int | None = None,
        adapters: bool = False,
    ) -> None:
        super().__init__(input_dims, output_dim)
        self.target = self.other_modality("film", condition_on, "condition_on", "conditions on")
        self.condition_on = condition_on
        self.hidden_dim = output_dim if hidden_dim is None else hidden_dim
        d_t = self.input_dims[self.target]
        self.fc = nn.Linear(self.input_dims[condition_on], 2 * self.hidden_dim)
        if d_t != self.hidden_dim:
            self.target_proj: nn.Module = nn.Linear(d_t, self.hidden_dim)
        else:
            self.target_proj = identity_linear(d_t) if adapters else nn.Identity()
        self.fc_out = nn.Linear(self.hidden_dim, output_dim)

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        gamma, beta = self.fc(features[self.condition_on].pooled).split(self.hidden_dim, dim=1)  # each (B, H)
        target = self.target_proj(features[self.target].pooled)  # (B, D_t) -> (B, H)
        fused = self.fc_out(gamma * target + beta)  # (B, D_out)
        return FusionOutput(fused=fused, extras={"gamma": gamma, "beta": beta})

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """`fc` for the conditioning modality, `target_proj` (empty when it is the identity) for the target."""
        super().modality_parameters(modality)  # checks the name
        return list((self.fc if modality == self.condition_on else self.target_proj).parameters())
