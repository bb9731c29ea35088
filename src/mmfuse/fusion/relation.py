"""Relation Network fusion (Santoro et al. 2017): an MLP over every pair of grid cells, conditioned on the question.

Shapes: B batch, T = h * w spatial tokens (objects), C their feature size, O = C + 2 an object with its coordinates,
D_q the question's pooled size, P = T * T pairs, G the width of g, F the width of f, D_out fused size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.base import FUSIONS, FusionOutput
from mmfuse.fusion.grid import GridFusion

AGGREGATES = ("sum", "mean", "attention")


@FUSIONS.register("relation")
class RelationFusion(GridFusion):
    """Relation Network: `fused = f(sum_{i,j} g([o_i; o_j; q]))` over all ordered pairs of grid cells.

        All ordered pairs (i, j), i == j included, as in the paper.

        The objects `o_i = [x_i; x_pos_i; y_pos_i]` are the `spatial` modality's tokens with their normalised grid
        coordinates (column, row in [-1, 1]); `q` is the other modality read by `question` (its pooled vector, or a GRU
    over its tokens: `fusion/question.py`). `g` has `g_layers` Linear+ReLU
        layers of width G; its first layer is computed per object and per question, never per pair:
        `W [o_i; o_j; q] + b = A o_i + B o_j + (C q + b)` (A o_i = `g_in_i(x_i) + g_pos_i(xy_i)`, B o_j likewise with
        `g_in_j`, `g_pos_j`; `g_in_q` gives C q + b), so only the later layers run on
        the P pairs, in chunks of at most `max_chunk_pairs` (sample, pair) rows; with `recompute` a chunk's activations
        are recomputed in the backward pass instead of kept (memory bounded by one chunk, 10-20% more time).
        `f` has `f_layers` Linear layers (ReLU between, width F; dropout before the last) ending at D_out.

        Aggregates: "sum" (the paper), "mean" (over real pairs), or "attention": `sum_ij softmax_ij(a . g_ij) g_ij`
        with a learned `a` (`score`). Padded tokens (`mask` False) and every token of an absent sample (`present` False)
        form no pair: their values change nothing. Exactly two modalities.

        `extras["pair_weights"]` (B, T, T), detached: `[b, i, j]` is pair (i, j)'s weight: its share of the attention,
        else the norm of `g_ij` (its contribution to the sum); 0 for pairs of padded tokens.

        Args:
            input_dims: {modality: D_m}, two modalities.
            output_dim: D_out.
            g_layers: layers of g (the paper: 4).
            g_dim: G, the width of g (the paper: 256).
            f_layers: layers of f, the last one to D_out.
            f_dim: F, the width of f's hidden layers; defaults to G.
            aggregate: "sum", "mean" or "attention".
            dropout: dropout before f's last layer (the paper: 0.5).
            max_chunk_pairs: the most (sample, pair) rows g's later layers run on at once.
            max_batch_pairs: the most (sample, pair) rows one batch may hold, B * T * T; a larger batch is refused.
            recompute: recompute each chunk in the backward pass (gradient checkpointing) rather than keep it.
            question: how q is read: "pooled" (the question's pooled vector) or "gru" (a GRU over its tokens, which
                keeps word order: "is the A left of the B?" against "is the B left of the A?").
            question_dim: the GRU's width with question: gru.
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        g_layers: int = 4,
        g_dim: int = 256,
        f_layers: int = 2,
        f_dim: int | None = None,
        aggregate: str = "sum",
        dropout: float = 0.0,
        max_chunk_pairs: int = 65536,
        max_batch_pairs: int = 1 << 22,
        recompute: bool = True,
        spatial: str | None = "auto",
        grid: tuple[int, int] | None = None,
        question: str = "pooled",
        question_dim: int = 256,
    ) -> None:
        super().__init__(input_dims, output_dim, "relation", spatial, grid, question, question_dim)
        if aggregate not in AGGREGATES:
            raise ValueError(f"relation aggregate must be one of {', '.join(AGGREGATES)}; got {aggregate!r}")
        if min(g_layers, f_layers, g_dim, f_dim or g_dim, max_chunk_pairs, max_batch_pairs) < 1:
            raise ValueError("relation g_layers, f_layers, g_dim, f_dim, max_chunk_pairs, max_batch_pairs must be >= 1")
        self.aggregate, self.recompute = aggregate, recompute
        self.max_chunk_pairs, self.max_batch_pairs = max_chunk_pairs, max_batch_pairs
        d_s = self.input_dims[self.spatial]
        self.g_in_i, self.g_in_j = nn.Linear(d_s, g_dim, bias=False), nn.Linear(d_s, g_dim, bias=False)  # A, B: x
        self.g_pos_i, self.g_pos_j = nn.Linear(2, g_dim, bias=False), nn.Linear(2, g_dim, bias=False)  # A, B: xy
        self.g_in_q = nn.Linear(self.reader.output_dim, g_dim)  # C, b
        self.g = nn.Sequential(
            *(m for _ in range(g_layers - 1) for m in (nn.Linear(g_dim, g_dim), nn.ReLU(inplace=True)))
        )
        self.score = nn.Linear(g_dim, 1) if aggregate == "attention" else None
        f_dim = f_dim or g_dim
        dims = [g_dim] + [f_dim] * (f_layers - 1)
        layers: list[nn.Module] = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        self.f = nn.Sequential(*layers, nn.Dropout(dropout), nn.Linear(dims[-1], output_dim))

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """g's first layer on the tokens (`g_in_i`, `g_in_j`) for the spatial modality, the question's reader and
        `g_in_q` for the question (the coordinates' `g_pos_i`, `g_pos_j` belong to no modality)."""
        super().modality_parameters(modality)  # checks the name
        if modality == self.spatial:
            return [*self.g_in_i.parameters(), *self.g_in_j.parameters()]
        return [*self.reader.parameters(), *self.g_in_q.parameters()]

    def check_batch(self, batch_size: int, num_tokens: int) -> None:
        """ValueError when B * T * T (sample, pair) rows are beyond `max_batch_pairs`."""
        rows = batch_size * num_tokens * num_tokens
        if rows > self.max_batch_pairs:
            raise ValueError(
                f"relation: a batch of {batch_size} samples x {num_tokens * num_tokens} pairs ({num_tokens} tokens) "
                f"is {rows} pair rows, beyond model.fusion.max_batch_pairs={self.max_batch_pairs}; lower "
                "data.batch_size, use a smaller grid, or raise model.fusion.max_batch_pairs if memory allows"
            )

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        tokens, mask, _, coords, q = self.grid_inputs(features)  # (B, T, C), (B, T), (h, w), (T, 2), (B, Q)
        b, t = mask.shape
        self.check_batch(b, t)
        a_i = self.g_in_i(tokens) + self.g_pos_i(coords)  # (B, T, G): A o_i with o_i = [x_i; xy_i]
        b_j = self.g_in_j(tokens) + self.g_pos_j(coords)  # (B, T, G): B o_j
        c_q = self.g_in_q(q)  # (B, G)
        pair_mask = mask.unsqueeze(2) & mask.unsqueeze(1)  # (B, T, T)
        rows = max(1, self.max_chunk_pairs // max(1, b * t))  # object rows i per chunk
        parts = []
        for start in range(0, t, rows):
            args = (a_i[:, start : start + rows], b_j, c_q, pair_mask[:, start : start + rows])
            run = self.recompute and torch.is_grad_enabled()
            parts.append(checkpoint(self._chunk, *args, use_reentrant=False) if run else self._chunk(*args))
        pooled, weights = self._combine(parts, pair_mask)  # (B, G), (B, T, T)
        return FusionOutput(fused=self.f(pooled), extras={"pair_weights": weights.detach()})

    def _chunk(
        self, a_i: torch.Tensor, b_j: torch.Tensor, c_q: torch.Tensor, pair_mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Rows i of the pair matrix: (B, R, G), (B, T, G), (B, G), (B, R, T) -> this chunk's partial aggregate.

        Returns (sum of g (B, G), g's norms (B, R, T)) or, for attention, (its max score (B,), sum of
        exp(score - max) (B,), sum of exp(score - max) g (B, G), scores (B, R, T)).
        """
        first = (a_i + c_q.unsqueeze(1)).unsqueeze(2) + b_j.unsqueeze(1)  # (B, R, T, G): a fresh tensor
        g = self.g(first.relu_())  # in place: one full-size tensor fewer per layer
        if self.score is None:
            keep = pair_mask.to(g.dtype)  # (B, R, T)
            with torch.no_grad():  # the pair weights are for reading, not for training
                norms = torch.linalg.vector_norm(g, dim=-1) * keep
            return torch.einsum("brt,brtg->bg", keep, g), norms
        scores = self.score(g).squeeze(-1)  # (B, R, T)
        top = scores.masked_fill(~pair_mask, float("-inf")).amax(dim=(1, 2))  # (B,), -inf without a real pair
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
        e = torch.where(pair_mask, scores - top[:, None, None], scores.new_tensor(float("-inf"))).exp()  # (B, R, T)
        return top, e.sum(dim=(1, 2)), (e.unsqueeze(-1) * g).sum(dim=(1, 2)), scores

    def _combine(
        self, parts: list[tuple[torch.Tensor, ...]], pair_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunks' partial aggregates -> the aggregate (B, G) and the pair weights (B, T, T)."""
        if self.score is None:
            pooled = torch.stack([p[0] for p in parts]).sum(dim=0)  # (B, G)
            if self.aggregate == "mean":
                pooled = pooled / pair_mask.sum(dim=(1, 2)).clamp(min=1).unsqueeze(1).to(pooled.dtype)
            return pooled, torch.cat([p[1] for p in parts], dim=1)
        tops, sums, nums = (torch.stack([p[k] for p in parts], dim=1) for k in range(3))  # (B, K), (B, K), (B, K, G)
        has = sums > 0
        top = tops.masked_fill(~has, float("-inf")).amax(dim=1, keepdim=True)  # (B, 1)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        scale = torch.where(has, tops - top, tops.new_tensor(float("-inf"))).exp()  # (B, K)
        total = (sums * scale).sum(dim=1)  # (B,)
        pooled = (nums * scale.unsqueeze(-1)).sum(dim=1) / total.clamp(min=1e-30).unsqueeze(1)  # (B, G)
        scores = torch.cat([p[3] for p in parts], dim=1)  # (B, T, T)
        shifted = torch.where(pair_mask, scores - top.unsqueeze(-1), scores.new_tensor(float("-inf")))
        return pooled, shifted.exp() / total.clamp(min=1e-30)[:, None, None]
