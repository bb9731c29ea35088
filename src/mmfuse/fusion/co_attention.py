"""Co-attention transformer fusion (ViLBERT, Lu et al. 2019): two token streams that attend to each other.

Shapes: B batch, T_m tokens of modality m, D_m its feature size, d model size, H heads, L layers, D_out fused size.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput
from mmfuse.fusion.cross_attention import CrossAttentionFusion
from mmfuse.fusion.positional import grid_shape, sincos_1d, sincos_2d


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
        q, k, v = (
            t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (self.q(x), self.k(context), self.v(context))
        )
        out, weights = CrossAttentionFusion._attend(q, k, v, c_mask, want_weights)  # (B, H, Q, d / H)
        return self.out(out.transpose(1, 2).flatten(2)), weights


class CoAttentionBlock(nn.Module):
    """One stream's half of a co-attention layer, all pre-norm and residual: `x += cross(norm(x), other's norm(other))`,
    then `x += self_attn(norm_self(x))` (optional), then `x += ffn(norm_ffn(x))`."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, self_attention: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.cross = Attention(dim, num_heads)
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.self_attn = Attention(dim, num_heads) if self_attention else None
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))

    def forward(
        self,
        x: torch.Tensor,
        normed: torch.Tensor,
        mask: torch.Tensor,
        other: torch.Tensor,
        o_mask: torch.Tensor,
        want_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, d) and its `norm(x)`, the other stream's normalised tokens (B, T_o, d) -> (B, T, d), weights."""
        attended, weights = self.cross(normed, other, o_mask, want_weights)
        x = x + attended
        if self.self_attn is not None:
            h = self.norm_self(x)
            x = x + self.self_attn(h, h, mask, False)[0]
        return x + self.ffn(self.norm_ffn(x)), weights


@FUSIONS.register("co_attention")
class CoAttentionFusion(Fusion):
    """Co-attention transformer over both token sets, pooled: `fc_out([mean_a(z_a), mean_b(z_b)])`.

    Each modality's tokens are layer-normalised, projected to d and given fixed sine-cosine positions (2-D on the
    `spatial` modality's h x w grid, 1-D on the other); then L layers, in each of which both streams attend to the
    other's previous state (ViLBERT's co-attention), optionally to themselves, and pass a feed-forward layer, all
    pre-norm and residual. `z_m` is the final normalised stream, averaged over its real tokens. Padded tokens and
    every token of an absent modality are masked out as keys and from the means, so their values change nothing.
    Exactly two modalities.

    When weights are requested, `extras["attention_<a>_to_<b>"]` holds the cross-attention weights of stream a over
    b's tokens in every layer (B, L, H, T_a, T_b), 0 on masked tokens.

    Args:
        input_dims: {modality: D_m}, two modalities.
        output_dim: D_out.
        hidden_dim: d, divisible by `num_heads` (and by 4 with positions); defaults to `output_dim`.
        num_layers: L.
        num_heads: H.
        ffn_dim: the feed-forward hidden size; defaults to 4 d.
        self_attention: also let each stream attend to itself in every layer.
        positional: add the positional encodings (off: the fusion cannot tell token order or place).
        spatial: the modality whose tokens are a flattened 2-D grid, or None (1-D positions for both). "auto": the
            builder asks the encoders (the one image encoder that gives tokens); built directly, "auto" means the
            modality called "image" if there is one.
        grid: (h, w) of the spatial grid; by default the square grid of its T tokens.
        return_weights: compute attention explicitly and return its weights (else `scaled_dot_product_attention`).
    """

    needs_tokens = True

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        hidden_dim: int | None = None,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int | None = None,
        self_attention: bool = True,
        positional: bool = True,
        spatial: str | None = "auto",
        grid: tuple[int, int] | None = None,
        return_weights: bool = False,
    ) -> None:
        super().__init__(input_dims, output_dim)
        if spatial == "auto":
            spatial = "image" if "image" in self.input_dims else None
        d = output_dim if hidden_dim is None else hidden_dim
        self._check(d, num_layers, num_heads, positional, spatial, grid)
        self.hidden_dim, self.positional, self.spatial, self.grid = d, positional, spatial, grid
        self.return_weights = return_weights
        self.norm_in = nn.ModuleDict({m: nn.LayerNorm(dm) for m, dm in self.input_dims.items()})
        self.proj = nn.ModuleDict({m: nn.Linear(dm, d) for m, dm in self.input_dims.items()})
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {m: CoAttentionBlock(d, num_heads, ffn_dim or 4 * d, self_attention) for m in self.modalities}
            )
            for _ in range(num_layers)
        )
        self.norm_out = nn.ModuleDict({m: nn.LayerNorm(d) for m in self.modalities})
        self.fc_out = nn.Linear(2 * d, output_dim)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The modality's input side, `norm_in` and `proj` (its stream's later layers already mix in the other)."""
        super().modality_parameters(modality)  # checks the name
        return [*self.norm_in[modality].parameters(), *self.proj[modality].parameters()]

    def _check(
        self, d: int, num_layers: int, num_heads: int, positional: bool, spatial: str | None, grid: object
    ) -> None:
        if len(self.modalities) != 2:
            raise ValueError(f"co_attention fuses exactly two modalities; got {self.modalities}")
        if spatial is not None and spatial not in self.input_dims:
            raise ValueError(f"co_attention spatial={spatial!r} is not one of {self.modalities} (or null)")
        if num_layers < 1 or num_heads < 1 or d % num_heads:
            raise ValueError(
                f"co_attention needs num_layers >= 1 and hidden_dim ({d}) divisible by num_heads ({num_heads})"
            )
        if positional and d % (4 if spatial else 2):
            raise ValueError(f"co_attention positions need hidden_dim ({d}) divisible by {4 if spatial else 2}")
        if grid is not None and not (positional and spatial):
            raise ValueError("co_attention grid acts only with positional=true and a spatial modality")

    def forward(self, features: dict[str, EncoderOutput], return_weights: bool | None = None) -> FusionOutput:
        """Fuse; `return_weights` overrides the init option for this call."""
        want = self.return_weights if return_weights is None else return_weights
        x, masks = {}, {}
        for m in self.modalities:
            tokens, masks[m] = real_tokens(features[m], m)  # (B, T_m, D_m), (B, T_m)
            x[m] = self.proj[m](self.norm_in[m](tokens)) + self._positions(m, tokens)  # (B, T_m, d)
        a, b = self.modalities
        weights: dict[str, list[torch.Tensor]] = {f"attention_{a}_to_{b}": [], f"attention_{b}_to_{a}": []}
        for layer in self.layers:
            normed = {m: layer[m].norm(x[m]) for m in self.modalities}
            new = {}
            for m, o in ((a, b), (b, a)):
                new[m], w = layer[m](x[m], normed[m], masks[m], normed[o], masks[o], want)
                if w is not None:
                    weights[f"attention_{m}_to_{o}"].append(w)
            x = new
        pooled = [masked_mean(self.norm_out[m](x[m]), masks[m]) for m in self.modalities]  # 2 x (B, d)
        extras = {k: torch.stack(v, dim=1) for k, v in weights.items() if v}  # (B, L, H, T_a, T_b)
        return FusionOutput(fused=self.fc_out(torch.cat(pooled, dim=1)), extras=extras)

    def _positions(self, m: str, tokens: torch.Tensor) -> torch.Tensor | float:
        """(T_m, d) fixed encodings of modality m's token positions (0 when `positional` is off)."""
        if not self.positional:
            return 0.0
        n, kw = tokens.shape[1], {"device": tokens.device, "dtype": tokens.dtype}
        if m == self.spatial:
            return sincos_2d(*grid_shape(n, self.grid, f"co_attention's {m} input"), self.hidden_dim, **kw)
        return sincos_1d(torch.arange(n, **kw), self.hidden_dim)


def real_tokens(side: EncoderOutput, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with padded or absent positions zeroed (B, T, D), and the mask of real tokens (B, T)."""
    if side.tokens is None:
        raise ValueError(f"co_attention needs {name} tokens, but the {name} features have tokens=None")
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
