"""Attention pieces shared by the token fusions (`cross_attention`, `co_attention`): masked multi-head attention,
the real tokens of a modality, fixed positions of its tokens, and the read-outs that turn a token stream into
vectors (a masked mean, or learned queries).

Shapes: B batch, Q queries, T key tokens, H heads, D_h head size, d model size, K learned read-out queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.positional import grid_shape, sincos_1d, sincos_2d

READOUTS = ("mean", "query", "cls")


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_mask: torch.Tensor, want_weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked attention (B, H, Q, D_h) x (B, H, T, D_h) -> (B, H, Q, D_h), and the weights (B, H, Q, T) when wanted.

    Keys where `k_mask` (B, T) is False get weight 0; a sample without any real key gets zero output (and zero
    weights), not NaN. Without `want_weights` this runs `scaled_dot_product_attention`.
    """
    has_key = k_mask.any(dim=1).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    # Such a sample attends uniformly here (finite), then its result is zeroed.
    attn_mask = k_mask[:, None, None, :] | ~has_key  # (B, 1, 1, T)
    keep = has_key.to(q.dtype)
    if not want_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask) * keep, None
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Q, T)
    weights = scores.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1) * keep
    return weights @ v, weights


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H * D_h) -> (B, H, N, D_h)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention of `x` over `context`, masked to the context's real tokens (zeros where none)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        for layer in (self.q, self.k, self.v, self.out):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, c_mask: torch.Tensor, want_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, Q, d), (B, T, d), (B, T) -> (B, Q, d) and the weights (B, H, Q, T) or None."""
        q, k, v = (split_heads(t, self.num_heads) for t in (self.q(x), self.k(context), self.v(context)))
        out, weights = attend(q, k, v, c_mask, want_weights)  # (B, H, Q, d / H)
        return self.out(out.transpose(1, 2).flatten(2)), weights


class QueryReadout(nn.Module):
    """K learned queries attend over a token stream's real tokens (Set Transformer's pooling by multi-head
    attention, PMA, Lee et al. 2019, without its feed-forward): `attention(S, tokens)` -> (B, K, d).

    The queries start small, so the read-out starts close to a mean over the real tokens and learns which tokens
    to pick; with several heads (or queries) it can pick several tokens apart, which a mean cannot keep apart.
    """

    def __init__(self, dim: int, num_queries: int, num_heads: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.empty(num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.attn = Attention(dim, num_heads)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, want_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, d), (B, T) -> (B, K, d) (zeros for a sample without real tokens), weights (B, H, K, T) or None."""
        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, K, d)
        return self.attn(queries, tokens, mask, want_weights)


def check_readout(fusion: str, readout: str, num_queries: int, allowed: tuple[str, ...] = READOUTS) -> None:
    """One-line errors for a `readout` option that is not one of `allowed`, or a `num_queries` below 1."""
    if readout not in allowed:
        raise ValueError(f"{fusion} readout must be one of {', '.join(map(repr, allowed))}; got {readout!r}")
    if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 1:
        raise ValueError(f"{fusion} num_queries must be an integer >= 1; got {num_queries!r}")
    if num_queries != 1 and readout != "query":
        raise ValueError(f"{fusion} num_queries acts only with readout='query' (got readout={readout!r})")


def real_tokens(side: EncoderOutput, name: str, fusion: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with padded or absent positions zeroed (B, T, D), and the mask of real tokens (B, T)."""
    if side.tokens is None:
        raise ValueError(f"{fusion} needs {name} tokens, but the {name} features have tokens=None")
    mask = torch.ones(side.tokens.shape[:2], dtype=torch.bool, device=side.tokens.device)
    if side.mask is not None:
        mask = mask & side.mask.bool()
    if side.present is not None:
        mask = mask & side.present.unsqueeze(1)
    return side.tokens.masked_fill(~mask.unsqueeze(-1), 0.0), mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T, d) over the real tokens of (B, T); zeros for a sample without any."""
    weight = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


def token_positions(
    tokens: torch.Tensor, dim: int, spatial: bool, grid: tuple[int, int] | None, where: str
) -> torch.Tensor:
    """(T, dim) fixed sine-cosine encodings of the T tokens of (B, T, D): 2-D on their h x w grid when `spatial`
    (`grid`, else the square one; `where` names the input in a grid error), else 1-D."""
    n, kw = tokens.shape[1], {"device": tokens.device, "dtype": tokens.dtype}
    if spatial:
        return sincos_2d(*grid_shape(n, grid, where), dim, **kw)
    return sincos_1d(torch.arange(n, **kw), dim)


def auto_spatial(spatial: str | None, modalities: list[str]) -> str | None:
    """A fusion's `spatial` option, with "auto" resolved for a fusion built directly: the modality called "image" if
    there is one, else None. (The builder replaces "auto" by the modality whose encoder gives a grid of tokens.)"""
    if spatial == "auto":
        return "image" if "image" in modalities else None
    return spatial


class TokenPositions:
    """The fixed positions a token fusion adds to its projected tokens: `(m, tokens (B, T, D))` -> (T, dim) 2-D
    sine-cosine encodings on the `spatial` modality's h x w grid, 1-D ones on another modality's tokens, or 0.0
    when `enabled` is off. The options are checked when it is made (`check_positions`); it holds no parameters.

    Args:
        fusion: the fusion's name, in errors.
        size_name: the option that sets `dim`, in errors ("output_dim", "hidden_dim").
        dim: size of each encoding (the fusion's model size).
        enabled: the fusion's `positional` option.
        spatial: the grid modality, or None.
        grid: (h, w) of the grid; by default the square grid of its T tokens.
        modalities: the fusion's modalities.
    """

    def __init__(
        self,
        fusion: str,
        size_name: str,
        dim: int,
        enabled: bool,
        spatial: str | None,
        grid: tuple[int, int] | None,
        modalities: list[str],
    ) -> None:
        check_positions(fusion, size_name, dim, enabled, spatial, grid, modalities)
        self.fusion, self.dim, self.enabled, self.spatial = fusion, dim, enabled, spatial
        self.grid = None if grid is None else tuple(grid)

    def __call__(self, m: str, tokens: torch.Tensor) -> torch.Tensor | float:
        """(T_m, dim) encodings of modality m's token positions, or 0.0 when off."""
        if not self.enabled:
            return 0.0
        return token_positions(tokens, self.dim, m == self.spatial, self.grid, f"{self.fusion}'s {m} input")


def check_positions(
    fusion: str, size_name: str, dim: int, positional: bool, spatial: str | None, grid: object, modalities: list[str]
) -> None:
    """One-line errors for position options that cannot work: an unknown spatial modality, a size the encodings
    cannot fill, a grid with nothing to act on."""
    if spatial is not None and spatial not in modalities:
        raise ValueError(f"{fusion} spatial={spatial!r} is not one of {modalities} (or null)")
    if positional and dim % (4 if spatial else 2):
        raise ValueError(
            f"{fusion} positions need {size_name} ({dim}) divisible by {4 if spatial else 2}; "
            f"set positional: false or change {size_name}"
        )
    if grid is not None and not (positional and spatial):
        raise ValueError(f"{fusion} grid acts only with positional=true and a spatial modality")
