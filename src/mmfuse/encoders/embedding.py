"""Precomputed vectors (CLIP, audio or any other embeddings) as a modality, without re-encoding.

Shapes: B batch, E input vector size (`dim`), D output size (`project`, or E without a projection).

A record's vector is a list of numbers (JSONL), a `.npy` file under the data root, or a group of CSV
columns (`columns: [e0, e1, ...]` or `prefix: e`). It goes through an optional projection
(Linear, then LayerNorm if asked) or through unchanged. Reading a vector (`as_vector`, `load_npy`) is in
`mmfuse.raw_inputs`, shared with the ONNX engine.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mmfuse.encoders.base import ENCODERS, Encoder, EncoderOutput, hash_file, hash_value
from mmfuse.raw_inputs import DataRoot, VectorRef, as_vector, check_vector, load_npy, read_vector


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
    file_suffixes = (".npy",)

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

    # ------------------------------------------------------------------ data side
    @property
    def has_tokens(self) -> bool:
        return True

    def fields(self, field: str) -> list[str]:
        """`columns`, or the first columns of a `prefix` group (numbered from 0 or 1), or `field`."""
        if self.columns is not None:
            return list(self.columns)
        if self.prefix is not None:
            return [f"{self.prefix}0", f"{self.prefix}1"]
        return [field]

    def read(self, row: Mapping[str, Any], field: str, root: DataRoot) -> VectorRef | None:
        """A list of numbers -> its values; a string -> the `.npy` path under the data root; a column group ->
        its cells as numbers. None when the vector is missing (null, empty, or every cell of the group empty)."""
        return read_vector(row, field, root, self.dim, self.columns, self.prefix)

    def check(self, ref: Hashable) -> str | None:
        """A `.npy` path: the file must hold a numeric (dim,) array of finite values, loadable without pickle."""
        return check_vector(ref, self.dim)

    def load(self, ref: Hashable) -> np.ndarray:
        """Reference -> the vector as an array."""
        return load_npy(ref) if isinstance(ref, str) else np.asarray(ref, dtype=np.float32)

    def content_hash(self, ref: Hashable) -> str:
        """A `.npy` file's bytes, or the values."""
        return hash_file(ref) if isinstance(ref, str) else hash_value(ref)

    def placeholder(self) -> torch.Tensor:
        """A zero vector (a missing vector's features are zeroed by the model anyway)."""
        return torch.zeros(self.dim)

    def preprocess(self, raw: Any, train: bool = False) -> torch.Tensor:
        """One vector (a list of numbers or an array) -> (E,) float32. `train` changes nothing."""
        return torch.from_numpy(as_vector(raw, self.dim))

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        """(E,) vectors -> (B, E)."""
        return torch.stack(items)

    # ------------------------------------------------------------------ network side
    def forward(self, inputs: torch.Tensor) -> EncoderOutput:
        """(B, E) vectors -> pooled (B, D) and one token (B, 1, D)."""
        pooled = self.norm(self.proj(inputs))  # (B, D)
        return EncoderOutput(pooled=pooled, tokens=pooled.unsqueeze(1))

    def cache_key(self) -> str:
        """Class, sizes, projection, normalisation and the weights' hash."""
        return (
            f"{type(self).__name__}:dim={self.dim}:out={self.output_dim}:proj={type(self.proj).__name__}:"
            f"norm={type(self.norm).__name__}:weights={self.weights_identity()}"
        )
