"""Recipe: 6-d precomputed vectors projected to 4; even samples give a list, odd ones a `.npy` file."""

from pathlib import Path
from typing import Any

import numpy as np

from recipes import Recipe

DIM = 6


def vector_row(i: int, root: Path, modality: str) -> dict[str, Any]:
    """A one-hot of the class (in the first 3 entries) plus small sample-specific values."""
    vector = np.zeros(DIM, dtype=np.float32)
    vector[i % 3] = 1.0
    vector[3:] = [0.1 * (i % 4), -0.05 * (i % 5), 0.01 * i]
    if i % 2 == 0:
        return {modality: [float(x) for x in vector]}
    path = root / f"{modality}_{i}.npy"
    if not path.exists():
        np.save(path, vector)
    return {modality: path.name}


RECIPE = Recipe("embedding", {"dim": DIM, "project": 4, "layer_norm": True}, vector_row)
