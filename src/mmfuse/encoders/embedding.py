"""Precomputed vectors (CLIP, audio or any other embeddings) as a modality, without re-encoding.

Shapes: B batch, E input vector size (`dim`), D output size (`project`, or E without a projection).

A record's vector is a list of numbers (JSONL), a `.npy` file under the data root, or a group of CSV
columns (`columns: [e0, e1, ...]` or `prefix: e`). It goes through an optional projection
(Linear, then LayerNorm if asked) or through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mmfuse.assets import module_sha256
from mmfuse.encoders.base import ENCODERS, Encoder, EncoderOutput


def as_vector(raw: Any, dim: int) -> np.ndarray:
    """A sequence of numbers or an array -> a float32 (dim,) array.

    Raises:
        ValueError: one line saying what is wrong (not numbers, wrong length, a non-finite value).
    """
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence | np.ndarray | torch.Tensor):
        raise ValueError(f"expected a vector of {dim} numbers, got {type(raw).__name__}")
    if isinstance(raw, Sequence) and any(isinstance(x, bool) or not isinstance(x, int | float) for x in raw):
        raise ValueError(f"expected a vector of {dim} numbers, got a list holding non-numbers")
    array = np.asarray(raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else raw)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"expected a vector of {dim} numbers, got an array of dtype {array.dtype}")
    if array.ndim != 1 or array.shape[0] != dim:
        raise ValueError(f"expected a vector of {dim} numbers, got shape {tuple(array.shape)}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"vector element {bad} is {array[bad]} (not finite)")
    return array


@ENCODERS.register("embedding")
class EmbeddingEncoder(Encoder):
    """Precomputed vectors of size `dim`, through an optional Linear (+ LayerNorm) projection.

    Args:
        dim: the size E of every input vector; a vector of another size is refused.
        project: output size of a Linear projection; None passes the vectors on unchanged.
        layer_norm: a LayerNorm after the projection (or on the raw vectors without one).
        columns: in CSV files, the columns that hold the vector, in order.
        prefix: in CSV files, instead of `columns`: every column named prefix + a number, by that number.
        freeze: no gradients and always eval mode.

    The output has one token (B, 1, D) besides the pooled vector, so attention fusions can use it.
    """

    modality = "embedding"

    def __init__(
        self,
        dim: int,
        project: int | None = None,
        layer_norm: bool = False,
        columns: list[str] | None = None,
        prefix: str | None = None,
        freeze: bool = False,
    ) -> None:
        super().__init__(freeze)
        if dim < 1 or (project is not None and project < 1):
            raise ValueError(f"embedding dim ({dim}) and project ({project}) must be positive")
        if columns is not None and prefix is not None:
            raise ValueError("embedding: give `columns` or `prefix`, not both")
        if columns is not None and len(columns) != dim:
            raise ValueError(f"embedding: {len(columns)} columns for vectors of dim {dim}")
        self.dim, self.columns, self.prefix = dim, columns, prefix
        self.proj = nn.Linear(dim, project) if project is not None else nn.Identity()
        out = project if project is not None else dim
        self.norm = nn.LayerNorm(out) if layer_norm else nn.Identity()
        self.output_dim = int(self.proj.out_features) if project is not None else dim
        self.finish_init()

    def preprocess(self, raw: Any, train: bool = False) -> torch.Tensor:
        """One vector (a list of numbers or an array) -> (E,) float32. `train` changes nothing."""
        return torch.from_numpy(as_vector(raw, self.dim))

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        """(E,) vectors -> (B, E)."""
        return torch.stack(items)

    def forward(self, inputs: torch.Tensor) -> EncoderOutput:
        """(B, E) vectors -> pooled (B, D) and one token (B, 1, D)."""
        pooled = self.norm(self.proj(inputs))  # (B, D)
        return EncoderOutput(pooled=pooled, tokens=pooled.unsqueeze(1))

    def weights_identity(self) -> str:
        if self._weights_id is None:
            self._weights_id = "random:" + module_sha256(self)
        return self._weights_id

    def cache_key(self) -> str:
        """Class, sizes, projection, normalisation and the weights' hash."""
        return (
            f"{type(self).__name__}:dim={self.dim}:out={self.output_dim}:proj={type(self.proj).__name__}:"
            f"norm={type(self.norm).__name__}:weights={self.weights_identity()}"
        )
