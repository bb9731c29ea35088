"""Cross-attention fusion: one modality's queries attend over the other modality's tokens.

Shapes: B batch, Q queries, T key tokens, H heads, D_h = D_out / H head size, D_q / D_k query / key side
feature sizes, D_out fused size, K learned read-out queries.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.attention import (
    QueryReadout,
    TokenPositions,
    attend,
    auto_spatial,
    check_readout,
    masked_mean,
    real_tokens,
    split_heads,
)
from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(Fusion):
    """Multi-head attention from a query modality over the other modality's tokens, pooled over queries.

    `fused = readout_q(out_proj(attention(q, k, v))) + q_res(n_q(query_pooled))` with
    `q = q_proj(n_q(query)) + p_q`, `k = k_proj(n_k(keys)) + p_k`, `v = v_proj(n_k(keys)) + p_k`
    (the residual term only when `residual`).

    `n_q`, `n_k` are LayerNorms of the query and key inputs when `norm` (pre-norm: frozen features of very different
    scales, e.g. 1280-d image activations and 384-d sentence embeddings, then meet on an equal footing and the
    softmax does not saturate), else the identity. `p_k` (and `p_q` for token queries) are fixed sine-cosine
    positions added to the projected tokens when `positional`: 2-D on the `spatial` modality's h x w grid, 1-D on
    the other side's tokens; 0 otherwise. Without them the output is invariant to a permutation of the key tokens,
    so a pooled query cannot tell where in the image a token was.

    Padded key tokens (`mask` False) and every key token of a sample whose key modality is absent (`present` False)
    are masked out; their values cannot change the output. A sample with no real key token gets zeros as its
    attended values (no NaN). Exactly two modalities.

    `readout_q` turns the per-query outputs into one vector: `mean` averages them over the real queries; `query`
    (with `query="tokens"`) lets K learned queries attend over them, masked to the real queries (Set Transformer's
    PMA), and projects the K results to D_out: `readout_proj([o_1, ..., o_K])`, so it can keep what two query
    tokens found apart where a mean blends them. (No `cls`: the queries never attend to each other, so a CLS query
    could read only the keys, never the query tokens; co_attention offers it.)

    `extras["attended"]` holds the per-query attended values before `out_proj` (B, Q, D_out); when weights are
    requested, `extras["attention"]` holds them (B, H, Q, T), 0 on masked tokens, and with `readout="query"`
    `extras["readout"]` holds the read-out's weights over the queries (B, H, K, Q).

    Args:
        input_dims: {modality: D_m}, two modalities.
        output_dim: D_out, divisible by `num_heads`.
        direction: "<query>_to_<key>", e.g. "image_to_text" (image queries over text tokens) or "text_to_image".
        query: "pooled" (the query side's pooled vector, Q = 1) or "tokens" (its tokens, with their mask).
        num_heads: H.
        return_weights: compute attention explicitly and return its weights (else `scaled_dot_product_attention`).
        residual: add a linear projection of the query side's (normalised) pooled vector.
        norm: LayerNorm the query and key inputs before their projections (pre-norm).
        positional: add fixed sine-cosine positions to the projected tokens (needs `output_dim` divisible by 4, or
            by 2 without a spatial modality).
        spatial: the modality whose tokens are a flattened 2-D grid, or None (1-D positions on both sides). "auto":
            the builder asks the encoders (the one image encoder that gives tokens); built directly, "auto" means
            the modality called "image" if there is one.
        grid: (h, w) of the spatial grid; by default the square grid of its T tokens.
        readout: "mean" or "query" (learned queries over the per-query outputs; needs `query="tokens"`).
        num_queries: K, the learned queries of `readout="query"`.
    """

    needs_tokens = True

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        direction: str = "image_to_text",
        query: str = "pooled",
        num_heads: int = 4,
        return_weights: bool = False,
        residual: bool = True,
        norm: bool = True,
        positional: bool = True,
        spatial: str | None = "auto",
        grid: tuple[int, int] | None = None,
        readout: str = "mean",
        num_queries: int = 1,
    ) -> None:
        super().__init__(input_dims, output_dim)
        spatial = auto_spatial(spatial, self.modalities)
        q_side, _, k_side = direction.partition("_to_")
        if len(self.modalities) != 2 or q_side == k_side or {q_side, k_side} != set(self.modalities):
            raise ValueError(
                f"cross_attention fuses exactly two modalities with direction '<query>_to_<key>'; "
                f"got modalities {self.modalities} and direction={direction!r}"
            )
        if query not in ("pooled", "tokens"):
            raise ValueError(f"cross_attention query must be 'pooled' or 'tokens', got {query!r}")
        if num_heads < 1 or output_dim % num_heads:
            raise ValueError(f"cross_attention output_dim ({output_dim}) must be divisible by num_heads ({num_heads})")
        self._positions = TokenPositions(
            "cross_attention", "output_dim", output_dim, positional, spatial, grid, self.modalities
        )
        self._check_readout(readout, num_queries, query)
        self.q_side, self.k_side, self.query = q_side, k_side, query
        self.num_heads, self.return_weights = num_heads, return_weights
        self.positional, self.spatial, self.grid = positional, spatial, self._positions.grid
        d_q, d_k = self.input_dims[q_side], self.input_dims[k_side]
        self.norm_q = nn.LayerNorm(d_q) if norm else None
        self.norm_k = nn.LayerNorm(d_k) if norm else None
        self.q_proj = nn.Linear(d_q, output_dim)
        self.k_proj = nn.Linear(d_k, output_dim)
        self.v_proj = nn.Linear(d_k, output_dim)
        self.out_proj = nn.Linear(output_dim, output_dim)
        self.q_res = nn.Linear(d_q, output_dim) if residual else None
        self.readout, self.num_queries = readout, num_queries
        if readout == "query":
            self.readout_pool = QueryReadout(output_dim, num_queries, num_heads)
            self.readout_proj = nn.Linear(num_queries * output_dim, output_dim)

    def forward(self, features: dict[str, EncoderOutput], return_weights: bool | None = None) -> FusionOutput:
        """Fuse; `return_weights` overrides the init option for this call."""
        query_side = features[self.q_side]
        if self.query == "pooled":
            queries = query_side.pooled.unsqueeze(1)  # (B, 1, D_q)
            q_mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)  # (B, 1)
            q_pos: torch.Tensor | float = 0.0
        else:
            queries, q_mask = real_tokens(query_side, self.q_side, "cross_attention")  # (B, Q, D_q), (B, Q)
            q_pos = self._positions(self.q_side, queries)  # (Q, D_out) or 0
        keys, k_mask = real_tokens(features[self.k_side], self.k_side, "cross_attention")  # (B, T, D_k), (B, T)
        keys = self._normed(self.norm_k, keys)
        k_pos = self._positions(self.k_side, keys)  # (T, D_out) or 0
        q = split_heads(self.q_proj(self._normed(self.norm_q, queries)) + q_pos, self.num_heads)  # (B, H, Q, D_h)
        k = split_heads(self.k_proj(keys) + k_pos, self.num_heads)  # (B, H, T, D_h)
        v = split_heads(self.v_proj(keys) + k_pos, self.num_heads)  # (B, H, T, D_h)
        want = self.return_weights if return_weights is None else return_weights
        out, weights = attend(q, k, v, k_mask, want)  # (B, H, Q, D_h), (B, H, Q, T) or None
        extras = {} if weights is None else {"attention": weights}
        attended = out.transpose(1, 2).flatten(2)  # (B, Q, H * D_h) = (B, Q, D_out)
        extras["attended"] = attended
        per_query = self.out_proj(attended)  # (B, Q, D_out)
        if self.readout == "query":
            read, read_weights = self.readout_pool(per_query, q_mask, want)  # (B, K, D_out), (B, H, K, Q) or None
            fused = self.readout_proj(read.flatten(1))  # (B, D_out)
            if read_weights is not None:
                extras["readout"] = read_weights
        else:
            fused = masked_mean(per_query, q_mask)  # (B, D_out)
        if self.q_res is not None:
            fused = fused + self.q_res(self._normed(self.norm_q, query_side.pooled))
        return FusionOutput(fused=fused, extras=extras)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The query side's `norm_q`, `q_proj` (and `q_res`), the key side's `norm_k`, `k_proj` and `v_proj`."""
        super().modality_parameters(modality)  # checks the name
        if modality == self.q_side:
            layers = [self.norm_q, self.q_proj, self.q_res]
        else:
            layers = [self.norm_k, self.k_proj, self.v_proj]
        return [p for layer in layers if layer is not None for p in layer.parameters()]

    @staticmethod
    def _check_readout(readout: str, num_queries: int, query: str) -> None:
        if readout == "cls":
            raise ValueError(
                "cross_attention readout='cls' is not offered: its queries never attend to each other, so a CLS query "
                "would read only the keys; use readout='query', or co_attention with readout='cls'"
            )
        check_readout("cross_attention", readout, num_queries, allowed=("mean", "query"))
        if readout == "query" and query != "tokens":
            raise ValueError("cross_attention readout='query' needs query='tokens' (a pooled query leaves one output)")

    @staticmethod
    def _normed(norm: nn.LayerNorm | None, x: torch.Tensor) -> torch.Tensor:
        return x if norm is None else norm(x)
