"""Co-attention transformer fusion (ViLBERT, Lu et al. 2019): two token streams that attend to each other.

Shapes: B batch, T_m tokens of modality m, D_m its feature size, d model size, H heads, L layers, D_out fused size.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.attention import (
    Attention,
    QueryReadout,
    TokenPositions,
    auto_spatial,
    check_readout,
    masked_mean,
    real_tokens,
)
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput

__all__ = ["CoAttentionBlock", "CoAttentionFusion"]


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
        want_self_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x (B, T, d) and its `norm(x)`, the other stream's normalised tokens (B, T_o, d) -> (B, T, d), the cross
        weights (B, H, T, T_o) and the self-attention weights (B, H, T, T) (each None unless wanted)."""
        attended, weights = self.cross(normed, other, o_mask, want_weights)
        x = x + attended
        self_weights = None
        if self.self_attn is not None:
            h = self.norm_self(x)
            out, self_weights = self.self_attn(h, h, mask, want_self_weights)
            x = x + out
        return x + self.ffn(self.norm_ffn(x)), weights, self_weights


@FUSIONS.register("co_attention")
class CoAttentionFusion(Fusion):
    """Co-attention transformer over both token sets, pooled: `fc_out([mean_a(z_a), mean_b(z_b)])`.

    Each modality's tokens are layer-normalised, projected to d and given fixed sine-cosine positions (2-D on the
    `spatial` modality's h x w grid, 1-D on the other); then L layers, in each of which both streams attend to the
    other's previous state (ViLBERT's co-attention), optionally to themselves, and pass a feed-forward layer, all
    pre-norm and residual. `z_m` is the final normalised stream. Padded tokens and every token of an absent modality
    are masked out as keys and from the read-outs, so their values change nothing. Exactly two modalities.

    The read-out turns each stream into a vector, and `fc_out` maps the two, concatenated, to D_out:

    - `mean`: `z_m` averaged over its real tokens. A mean cannot keep two tokens apart ("the square's x" and "the
      triangle's x" arrive as one average), so only the layers can put a comparison into a token.
    - `query`: K learned queries per stream attend (multi-head) over `z_m`'s real tokens (Set Transformer's PMA);
      `fc_out([r_a1, ..., r_aK, r_b1, ..., r_bK])`. Each head can pick a different token.
    - `cls`: a learned CLS token (no position) is prepended to each stream and goes through every layer: it attends
      to the other stream like any token and, with `self_attention`, to its own stream; `fc_out([z_a[CLS], z_b[CLS]])`.
      A stream's CLS is no key of the other stream (which so reads only real tokens); without `self_attention` it
      reads its own stream only through the other stream's tokens of earlier layers.

    When weights are requested, `extras["attention_<a>_to_<b>"]` holds the cross-attention weights of stream a's
    tokens over b's tokens in every layer (B, L, H, T_a, T_b), 0 on masked tokens, and the read-out's weights:
    `extras["readout_<m>"]` (B, H, K, T_m) over `z_m` for `query`; for `cls` the CLS's self-attention row
    `extras["readout_<m>"]` (B, L, H, 1 + T_m) (index 0 is the CLS itself) and its cross-attention row
    `extras["readout_<m>_to_<o>"]` (B, L, H, T_o).

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
        readout: "mean", "query" or "cls" (above).
        num_queries: K, the learned queries per stream of `readout="query"`.
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
        readout: str = "mean",
        num_queries: int = 1,
    ) -> None:
        super().__init__(input_dims, output_dim)
        spatial = auto_spatial(spatial, self.modalities)
        d = output_dim if hidden_dim is None else hidden_dim
        self._check(d, num_layers, num_heads)
        self._positions = TokenPositions("co_attention", "hidden_dim", d, positional, spatial, grid, self.modalities)
        check_readout("co_attention", readout, num_queries)
        self.hidden_dim, self.positional, self.spatial, self.grid = d, positional, spatial, grid
        self.return_weights, self.readout, self.num_queries = return_weights, readout, num_queries
        self.norm_in = nn.ModuleDict({m: nn.LayerNorm(dm) for m, dm in self.input_dims.items()})
        self.proj = nn.ModuleDict({m: nn.Linear(dm, d) for m, dm in self.input_dims.items()})
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {m: CoAttentionBlock(d, num_heads, ffn_dim or 4 * d, self_attention) for m in self.modalities}
            )
            for _ in range(num_layers)
        )
        self.norm_out = nn.ModuleDict({m: nn.LayerNorm(d) for m in self.modalities})
        if readout == "cls":
            self.cls = nn.ParameterDict(
                {m: nn.Parameter(nn.init.trunc_normal_(torch.empty(d), std=0.02)) for m in self.modalities}
            )
        if readout == "query":
            self.readout_pool = nn.ModuleDict({m: QueryReadout(d, num_queries, num_heads) for m in self.modalities})
        self.fc_out = nn.Linear(2 * d * (num_queries if readout == "query" else 1), output_dim)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The modality's input side, `norm_in` and `proj` (its stream's later layers already mix in the other)."""
        super().modality_parameters(modality)  # checks the name
        return [*self.norm_in[modality].parameters(), *self.proj[modality].parameters()]

    def _check(self, d: int, num_layers: int, num_heads: int) -> None:
        if len(self.modalities) != 2:
            raise ValueError(f"co_attention fuses exactly two modalities; got {self.modalities}")
        if num_layers < 1 or num_heads < 1 or d % num_heads:
            raise ValueError(
                f"co_attention needs num_layers >= 1 and hidden_dim ({d}) divisible by num_heads ({num_heads})"
            )

    def forward(self, features: dict[str, EncoderOutput], return_weights: bool | None = None) -> FusionOutput:
        """Fuse; `return_weights` overrides the init option for this call."""
        want = self.return_weights if return_weights is None else return_weights
        x, masks, own = self._streams(features)  # (B, n + T_m, d), real tokens (B, T_m), own keys (B, n + T_m)
        n = 1 if self.readout == "cls" else 0  # the CLS in front of each stream
        a, b = self.modalities
        weights: dict[str, list[torch.Tensor]] = {f"attention_{a}_to_{b}": [], f"attention_{b}_to_{a}": []}
        for layer in self.layers:
            normed = {m: layer[m].norm(x[m]) for m in self.modalities}
            new = {}
            for m, o in ((a, b), (b, a)):
                new[m], w, w_self = layer[m](x[m], normed[m], own[m], normed[o][:, n:], masks[o], want, want and n > 0)
                if w is not None:
                    weights[f"attention_{m}_to_{o}"].append(w[:, :, n:])  # (B, H, T_m, T_o)
                    if n:
                        weights.setdefault(f"readout_{m}_to_{o}", []).append(w[:, :, 0])  # (B, H, T_o)
                if w_self is not None:
                    weights.setdefault(f"readout_{m}", []).append(w_self[:, :, 0])  # (B, H, 1 + T_m)
            x = new
        extras = {k: torch.stack(v, dim=1) for k, v in weights.items() if v}  # (B, L, H, ...)
        read = []
        for m in self.modalities:
            z = self.norm_out[m](x[m])  # (B, n + T_m, d)
            if self.readout == "mean":
                read.append(masked_mean(z, masks[m]))  # (B, d)
            elif self.readout == "cls":
                read.append(z[:, 0])  # (B, d)
            else:
                r, w = self.readout_pool[m](z, masks[m], want)  # (B, K, d), (B, H, K, T_m) or None
                read.append(r.flatten(1))  # (B, K * d)
                if w is not None:
                    extras[f"readout_{m}"] = w
        return FusionOutput(fused=self.fc_out(torch.cat(read, dim=1)), extras=extras)

    def _streams(
        self, features: dict[str, EncoderOutput]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each stream's input (B, n + T_m, d) with the CLS first when `readout="cls"` (n = 1, else 0), the mask of
        its real tokens (B, T_m), and of the keys of its own self-attention, CLS included (B, n + T_m)."""
        x, masks, own = {}, {}, {}
        for m in self.modalities:
            tokens, masks[m] = real_tokens(features[m], m, "co_attention")  # (B, T_m, D_m), (B, T_m)
            x[m] = self.proj[m](self.norm_in[m](tokens)) + self._positions(m, tokens)  # (B, T_m, d)
            own[m] = masks[m]
            if self.readout == "cls":
                x[m] = torch.cat([self.cls[m].expand(x[m].shape[0], 1, -1), x[m]], dim=1)  # (B, 1 + T_m, d)
                own[m] = torch.cat([torch.ones_like(masks[m][:, :1]), masks[m]], dim=1)  # (B, 1 + T_m)
        return x, masks, own
