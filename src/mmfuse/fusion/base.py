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

    def other_modality(self, name: str, chosen: str, option: str, verb: str) -> str:
        """The modality of a two-modality fusion that option `option` did not choose; ValueError (one line) unless
        the fusion has exactly two modalities and `chosen` is one of them.

        Args:
            name: the fusion's registered name, for the message.
            chosen: the modality the option names.
            option: the option's name (`condition_on`, `gate_on`), for the message.
            verb: what the fusion does with the chosen modality ("conditions on", "gates on"), for the message.
        """
        if len(self.modalities) != 2 or chosen not in self.input_dims:
            raise ValueError(
                f"{name} fuses exactly two modalities and {verb} one of them; "
                f"got modalities {self.modalities} and {option}={chosen!r}"
            )
        return next(m for m in self.modalities if m != chosen)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The parameters that belong to `modality` alone (its own input projection/adapter), for modality balancing.

        Default: entry `modality` of every direct child that is an `nn.ModuleDict`/`nn.ParameterDict` keyed by
        exactly this fusion's modalities (`fc` of sum and gated, `proj` of bilinear/tensor/lmf, `factors` of lmf,
        `norm_in`/`proj`/`norm_out` of co_attention, `adapter` of concat). Fusions laid out otherwise override it.
        """
        if modality not in self.input_dims:
            raise KeyError(f"{type(self).__name__} has no modality {modality!r}; modalities: {self.modalities}")
        keys = set(self.modalities)
        out: list[nn.Parameter] = []
        for child in self.children():
            if isinstance(child, nn.ModuleDict) and set(child.keys()) == keys:
                out.extend(child[modality].parameters())
            elif isinstance(child, nn.ParameterDict) and set(child.keys()) == keys:
                out.append(child[modality])
        return out


def identity_linear(dim: int) -> nn.Linear:
    """`nn.Linear(dim, dim)` that starts as the identity map (a per-modality adapter that changes nothing at first)."""
    layer = nn.Linear(dim, dim)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer
