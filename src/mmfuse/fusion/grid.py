"""The common part of the fusions that reason over one modality's grid of tokens, conditioned on the other
modality (the question): `relation` and `spatial_film`.

Shapes: B batch, T = h * w grid cells, C their feature size, Q the read question's size.
"""

from __future__ import annotations

import torch

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.attention import auto_spatial, real_tokens
from mmfuse.fusion.base import Fusion
from mmfuse.fusion.positional import coord_grid, grid_shape
from mmfuse.fusion.question import QuestionReader


class GridFusion(Fusion):
    """Two modalities: `spatial`, whose tokens are a flattened h x w grid, and the question, read by `reader`.

    Args:
        input_dims: {modality: D_m}, two modalities.
        output_dim: D_out.
        name: the fusion's registered name, for messages.
        spatial: the grid modality; "auto": the builder asks the encoders, built directly the one called "image".
        grid: (h, w) of the grid; by default the square grid of its T tokens (a non-square T needs it).
        question: "pooled" or "gru" (`fusion/question.py`).
        question_dim: the GRU's width with question: gru.
    """

    needs_tokens = True
    needs_grid = True  # the builder refuses it, before training, when no encoder gives a grid of tokens

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        name: str,
        spatial: str | None,
        grid: tuple[int, int] | None,
        question: str,
        question_dim: int,
    ) -> None:
        super().__init__(input_dims, output_dim)
        self.name = name
        self.spatial, self.question = spatial_and_question(name, self.modalities, spatial)
        self.grid = None if grid is None else tuple(grid)
        self.reader = QuestionReader(question, self.input_dims[self.question], question_dim, name)

    def grid_inputs(
        self, features: dict[str, EncoderOutput]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor, torch.Tensor]:
        """tokens (B, T, C) with padded cells zeroed, mask (B, T), (h, w), coordinates (T, 2), question (B, Q)."""
        tokens, mask = spatial_tokens(features[self.spatial], self.spatial, self.name)
        h, w = grid_shape(mask.shape[1], self.grid, f"{self.name}'s {self.spatial} input")
        coords = coord_grid(h, w, device=tokens.device, dtype=tokens.dtype)
        return tokens, mask, (h, w), coords, self.reader(features[self.question], self.question)


def spatial_and_question(name: str, modalities: list[str], spatial: str | None) -> tuple[str, str]:
    """(the grid modality, the other one) of a two-modality fusion that reasons over one modality's grid."""
    spatial = auto_spatial(spatial, modalities)
    if len(modalities) != 2:
        raise ValueError(f"{name} fuses exactly two modalities (a grid of tokens and a question); got {modalities}")
    if spatial not in modalities:
        raise ValueError(
            f"{name} reasons over the grid of tokens of one modality: set spatial to one of {modalities} "
            f"(got {spatial!r})"
        )
    return spatial, next(m for m in modalities if m != spatial)


def spatial_tokens(side: EncoderOutput, modality: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid tokens with padded or absent cells zeroed (B, T, C), and the mask of real cells (B, T)."""
    if side.tokens is None:
        raise ValueError(
            f"{name} needs {modality} tokens (a grid), but the {modality} features have tokens=None: "
            f"use an image encoder that gives tokens (tokens: true, or the conv encoder)"
        )
    return real_tokens(side, modality, name)
