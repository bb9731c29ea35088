"""Spatial FiLM fusion (Perez et al. 2018): FiLM-ed residual conv blocks over a grid of tokens, then a max-pooled stem.

Shapes: B batch, T = h * w spatial tokens, C their feature size, D_q the question's pooled size, W the blocks'
width, K the classifier's channels, N blocks, D_out fused size.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.base import FUSIONS, FusionOutput
from mmfuse.fusion.grid import GridFusion

POOLS = ("max", "max_xy")


class FiLMedBlock(nn.Module):
    """`p = relu(conv1x1([x; xy]))`, `out = p + relu(gamma * bn(conv3x3(p)) + beta)` (the official FiLMedResBlock:
    coordinates before the input projection, BatchNorm without affine, FiLM after it, residual on `p`)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv2d(width + 2, width, kernel_size=1)
        self.conv = nn.Conv2d(width, width, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(width, affine=False)

    def forward(self, x: torch.Tensor, coords: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """(B, W, h, w), (B, 2, h, w), (B, W), (B, W) -> (B, W, h, w)."""
        p = torch.relu(self.input_proj(torch.cat([x, coords], dim=1)))
        out = self.bn(self.conv(p)) * gamma[:, :, None, None] + beta[:, :, None, None]
        return p + torch.relu(out)


@FUSIONS.register("spatial_film")
class SpatialFiLMFusion(GridFusion):
    """FiLM on the token grid: `fused = fc(maxpool(relu(conv1x1([x_N; xy]))))`, x_N after N FiLM-ed conv blocks.

    The `spatial` modality's tokens (B, T, C) become a map (B, C, h, w); the stem `x_0 = relu(bn(conv1x1([map; xy])))`
    projects it with its coordinate channels (x, y in [-1, 1]) to `width` channels. Each of the `num_blocks` blocks
    is `p = relu(conv1x1([x; xy]))`, `x' = p + relu(gamma_k * bn(conv3x3(p)) + beta_k)`, BatchNorm without affine,
    and `gamma_k = 1 + dgamma_k`, `beta_k` predicted from the other modality `q` (read by `question`: its pooled
    vector, or a GRU over its tokens as in the paper, `fusion/question.py`) by one linear layer
    (`film`: `[dgamma_1, beta_1, ..., dgamma_N, beta_N] = W q + b`, gamma around 1 as in the official code). The
    classifier stem: coordinates, a 1x1 conv to `classifier_channels`, ReLU, global max pooling over real cells, and a
    linear layer to D_out. With `pool: max_xy` each of the K channels also gives where it fires: the mean of the
    cells' coordinates weighted by the softmax over real cells of its pre-ReLU activation (a spatial soft-argmax,
    Levine et al. 2016), so the linear layer reads `[max_k; x_k; y_k]` (3K) and can compare two objects' positions
    directly. Padded or absent cells are zero in the map and left out of the max (a sample without any real cell
    pools to 0). BatchNorm uses batch statistics in training: there, samples of a batch are not independent.
    Exactly two modalities.

    Args:
        input_dims: {modality: D_m}, two modalities.
        output_dim: D_out.
        width: W, the channels of the blocks (the paper: 128).
        num_blocks: N (the paper: 4).
        classifier_channels: K (the paper: 512).
        pool: "max" (the paper) or "max_xy" (max pooling and each channel's soft-argmax position).
        spatial, grid, question, question_dim: the grid modality, its (h, w), how q is read ("pooled", or "gru": a
            GRU over its tokens, which keeps word order; the paper's question encoder is a GRU): see `GridFusion`.
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        width: int = 128,
        num_blocks: int = 4,
        classifier_channels: int = 512,
        pool: str = "max",
        spatial: str | None = "auto",
        grid: tuple[int, int] | None = None,
        question: str = "pooled",
        question_dim: int = 256,
    ) -> None:
        super().__init__(input_dims, output_dim, "spatial_film", spatial, grid, question, question_dim)
        if min(width, num_blocks, classifier_channels) < 1:
            raise ValueError("spatial_film width, num_blocks and classifier_channels must be >= 1")
        if pool not in POOLS:
            raise ValueError(f"spatial_film pool must be one of {', '.join(POOLS)}; got {pool!r}")
        self.pool = pool
        self.width, self.num_blocks = width, num_blocks
        # The stem's 1x1 conv over [map; xy], split into the tokens' part (the modality's own) and the coordinates'.
        self.stem = nn.Conv2d(self.input_dims[self.spatial], width, kernel_size=1)
        self.stem_xy = nn.Conv2d(2, width, kernel_size=1, bias=False)
        self.stem_norm = nn.BatchNorm2d(width)
        self.film = nn.Linear(self.reader.output_dim, 2 * width * num_blocks)
        self.blocks = nn.ModuleList(FiLMedBlock(width) for _ in range(num_blocks))
        self.classifier = nn.Conv2d(width + 2, classifier_channels, kernel_size=1)
        self.fc = nn.Linear(classifier_channels * (3 if pool == "max_xy" else 1), output_dim)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The stem's conv over the tokens for the spatial modality, the reader and FiLM generator for the question."""
        super().modality_parameters(modality)  # checks the name
        if modality == self.spatial:
            return list(self.stem.parameters())
        return [*self.reader.parameters(), *self.film.parameters()]

    def forward(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        tokens, mask, (h, w), xy, q = self.grid_inputs(features)  # (B, T, C), (B, T), grid, (T, 2), (B, Q)
        b = mask.shape[0]
        fmap = tokens.transpose(1, 2).unflatten(2, (h, w))  # (B, C, h, w)
        coords = xy.T.unflatten(1, (h, w)).expand(b, 2, h, w)  # (B, 2, h, w)
        film = self.film(q).view(b, self.num_blocks, 2, self.width)  # (B, N, 2, W)
        x = torch.relu(self.stem_norm(self.stem(fmap) + self.stem_xy(coords)))  # (B, W, h, w)
        for k, block in enumerate(self.blocks):
            x = block(x, coords, 1 + film[:, k, 0], film[:, k, 1])
        logits = self.classifier(torch.cat([x, coords], dim=1)).flatten(2)  # (B, K, T), before the ReLU
        x = torch.relu(logits)
        real = mask.unsqueeze(1)  # (B, 1, T)
        pooled = x.masked_fill(~real, float("-inf")).amax(dim=2)  # (B, K)
        if self.pool == "max_xy":
            where = torch.softmax(logits.masked_fill(~real, torch.finfo(logits.dtype).min), dim=2) @ xy  # (B, K, 2)
            pooled = torch.cat([pooled, where.flatten(1)], dim=1)  # (B, 3K)
        pooled = torch.where(mask.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))  # absent sample: 0
        extras = {"gamma": 1 + film[:, :, 0].flatten(1), "beta": film[:, :, 1].flatten(1)}  # each (B, N * W)
        return FusionOutput(fused=self.fc(pooled), extras=extras)

    @property
    def condition_on(self) -> str:
        """The modality that predicts gamma and beta (as `film`'s option of that name; `explain` reads it)."""
        return self.question

    @property
    def target(self) -> str:
        """The modality that is modulated."""
        return self.spatial
