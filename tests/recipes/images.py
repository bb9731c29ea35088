"""Image files for the image recipes: sample i is a square of colour i % 3 with a darker corner."""

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


def image_row(i: int, root: Path, modality: str) -> dict[str, Any]:
    path = root / f"{modality}_{i}.png"
    if not path.exists():
        arr = np.full((20, 20, 3), COLORS[i % 3], dtype=np.uint8)
        arr[: 4 + i % 7, : 3 + i % 5] //= 2
        Image.fromarray(arr).save(path)
    return {modality: path.name}
