"""Task heads: (B, D_in) fused features -> (B, C) outputs of one task."""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("head")


@HEADS.register("mlp")
class MLPHead(nn.Module):
    """A Linear head, or an MLP when `hidden_dims` is non-empty: (B, D_in) -> (B, C)."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dims: list[int] | None = None, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        d = input_dim
        for h in hidden_dims or []:
            layers += [nn.Linear(d, h), nn.GELU(), nn.Dropout(dropout)]
            d = h
        if not layers and dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(d, output_dim))
        self.net = nn.Sequential(*layers)
        self.input_dim, self.output_dim = input_dim, output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def linear_head(head: nn.Module) -> nn.Linear | None:
    """The head's only affine layer when the head is linear (an `nn.Linear`, or an `MLPHead` without hidden layers:
    its `net` holds one `nn.Linear` and only Dropout or Identity besides, the identity in eval mode); else None.

    Exact per-modality logit contributions (modality balancing, `mmfuse explain`) need this layer.
    """
    if isinstance(head, nn.Linear):
        return head
    net = getattr(head, "net", None)
    if isinstance(net, nn.Sequential):
        layers = [m for m in net if not isinstance(m, (nn.Dropout, nn.Identity))]
        if len(layers) == 1 and isinstance(layers[0], nn.Linear):
            return layers[0]
    return None
