"""Corruptions of raw inputs at a severity in [0, 1]: plain functions on PIL images, strings and masks.

Each function takes the raw input (what an encoder's `load` returns), a severity and a NumPy generator, and
returns the corrupted input. Severity 0 returns the input itself (the identity), so a severity-0 condition
is the clean input. The generator of one input is derived from (seed, kind, the input's content hash) by
`rng_for`, so one input is corrupted the same way in every record and every run, and the draws do not
depend on the severity: a higher severity scales the same noise, grows the same square from the same corner
draw, and removes or permutes a superset of the words.

| kind           | applies to | severity s                                                               |
|----------------|------------|--------------------------------------------------------------------------|
| `noise`        | image      | Gaussian noise of std s in [0, 1] pixel units, clipped to [0, 1]          |
| `blur`         | image      | Gaussian blur of std s * 0.1 * min(H, W) pixels                           |
| `occlude`      | image      | a random grey square covering the fraction s of the area (*)             |
| `word_dropout` | text       | round(s * n) of the n words removed                                      |
| `shuffle`      | text       | round(s * n) of the n words permuted among their places (each one moves) |
| `absent`       | any        | each record lacks the modality with probability s (1: dropped)           |

(*) a square on a square image; on another shape a rectangle of the image's aspect, so s = 1 covers it all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from mmfuse.io import sha256_text

BLUR_MAX_FRACTION = 0.1  # the blur's std at severity 1, as a fraction of the image's shorter side
OCCLUDER_GREY = 127


def rng_for(seed: int, kind: str, content: str) -> np.random.Generator:
    """The generator that corrupts one input: a function of (seed, kind, the input's content hash) only."""
    digest = bytes.fromhex(sha256_text(f"{kind}|{content}"))
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def gaussian_noise(image: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    """Adds N(0, severity^2) to every channel of every pixel (pixel values in [0, 1]), clipped, rounded to 8 bits."""
    if severity == 0:
        return image
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0  # (H, W, 3)
    noisy = pixels + rng.standard_normal(pixels.shape) * severity
    return Image.fromarray(np.round(np.clip(noisy, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")


def gaussian_blur(image: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur of standard deviation `severity * BLUR_MAX_FRACTION * min(H, W)` pixels (no randomness)."""
    if severity == 0:
        return image
    sigma = severity * BLUR_MAX_FRACTION * min(image.size)
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius=sigma))


def occlude(image: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    """A grey box at a random place covering the fraction `severity` of the area (a square on a square image)."""
    if severity == 0:
        return image
    width, height = image.size
    x0_unit, y0_unit = rng.random(2)  # drawn first and always: the box grows from the same draw
    w = min(width, max(1, round(np.sqrt(severity) * width)))
    h = min(height, max(1, round(np.sqrt(severity) * height)))
    x0, y0 = int(x0_unit * (width - w + 1)), int(y0_unit * (height - h + 1))
    pixels = np.array(image.convert("RGB"))  # (H, W, 3), a copy
    pixels[y0 : y0 + h, x0 : x0 + w] = OCCLUDER_GREY
    return Image.fromarray(pixels, "RGB")


def _chosen(n: int, severity: float, rng: np.random.Generator) -> np.ndarray:
    """round(severity * n) word positions, in a random order that does not depend on the severity."""
    order = rng.permutation(n)
    return order[: int(np.floor(severity * n + 0.5))]


def word_dropout(text: str, severity: float, rng: np.random.Generator) -> str:
    """Removes round(severity * n) of the text's n (whitespace-separated) words; every word at severity 1."""
    words = text.split()
    drop = set(_chosen(len(words), severity, rng).tolist())
    if not drop:
        return text
    return " ".join(w for i, w in enumerate(words) if i not in drop)


def shuffle_words(text: str, severity: float, rng: np.random.Generator) -> str:
    """Permutes round(severity * n) of the n words among their own places, so that each of them moves.

    The chosen places, in a random order p_1..p_k, pass their words on cyclically (p_i gets p_{i+1}'s word);
    fewer than two chosen words leave the text as it is (one word cannot move alone).
    """
    words = text.split()
    chosen = _chosen(len(words), severity, rng).tolist()
    if len(chosen) < 2:
        return text
    out = list(words)
    for i, place in enumerate(chosen):
        out[place] = words[chosen[(i + 1) % len(chosen)]]
    return " ".join(out)


def absent_mask(n: int, severity: float, seed: int) -> torch.Tensor:
    """(n,) bool: record i lacks the modality where u_i < severity, u ~ U(0, 1) drawn from `seed` (nested in s)."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    return u < severity


@dataclass(frozen=True)
class CorruptionKind:
    """A corruption: the kind of input it applies to (an encoder's `modality`, or None: any) and its function."""

    name: str
    applies_to: str | None
    fn: Callable[[Any, float, np.random.Generator], Any] | None  # None: `absent`, a mask, not a function of input


CORRUPTIONS: dict[str, CorruptionKind] = {
    c.name: c
    for c in (
        CorruptionKind("noise", "image", gaussian_noise),
        CorruptionKind("blur", "image", gaussian_blur),
        CorruptionKind("occlude", "image", occlude),
        CorruptionKind("word_dropout", "text", word_dropout),
        CorruptionKind("shuffle", "text", shuffle_words),
        CorruptionKind("absent", None, None),
    )
}


def kinds_for(input_kind: str) -> list[str]:
    """The corruption kinds that apply to an input kind (an encoder's `modality`: "image", "text", ...)."""
    return [c.name for c in CORRUPTIONS.values() if c.applies_to in (None, input_kind)]
