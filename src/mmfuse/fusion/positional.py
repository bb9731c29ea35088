"""Fixed sine-cosine positional encodings (Vaswani et al. 2017; the 2-D form of MAE, He et al. 2022).

Shapes: N positions, D encoding size, h x w a token grid flattened row-major (token i * w + j is row i, column j).
"""

from __future__ import annotations

import math

import torch


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """`[sin(p * f_0), ..., sin(p * f_{D/2-1}), cos(p * f_0), ..., cos(p * f_{D/2-1})]` with `f_i = 10000^(-2i/D)`.

    Args:
        positions: (N,) positions (float or int).
        dim: D, even.

    Returns:
        (N, D) encodings, in the dtype of `positions` when it is floating (else float32).
    """
    if dim % 2:
        raise ValueError(f"a 1-D sine-cosine encoding needs an even size, got {dim}")
    dtype = positions.dtype if positions.is_floating_point() else torch.float32
    freqs = torch.exp(torch.arange(dim // 2, device=positions.device, dtype=dtype) * (-2 * math.log(10000.0) / dim))
    angles = positions.to(dtype).unsqueeze(1) * freqs  # (N, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(
    h: int, w: int, dim: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Grid encodings: the first D/2 channels encode the row, the last D/2 the column (each a 1-D encoding).

    Returns:
        (h * w, D) encodings of the row-major flattened grid.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine encoding needs a size divisible by 4, got {dim}")
    rows = torch.arange(h, device=device, dtype=dtype or torch.float32).repeat_interleave(w)  # (h * w,) i
    cols = torch.arange(w, device=device, dtype=dtype or torch.float32).repeat(h)  # (h * w,) j
    return torch.cat([sincos_1d(rows, dim // 2), sincos_1d(cols, dim // 2)], dim=1)


def grid_shape(num_tokens: int, grid: tuple[int, int] | None, name: str) -> tuple[int, int]:
    """The (h, w) grid of `num_tokens` spatial tokens: `grid` when given, else the square one."""
    if grid is not None:
        h, w = grid
        if h * w != num_tokens:
            raise ValueError(f"{name} has {num_tokens} tokens, but grid {h} x {w} holds {h * w}")
        return h, w
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{name} has {num_tokens} tokens, not a square grid; set the fusion option grid: [h, w]")
    return side, side


def coord_grid(h: int, w: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The normalised (x, y) coordinates of every cell of an h x w grid, row-major (FiLM's `coord_map`, Perez et al.
    2018; the relation network's object coordinates, Santoro et al. 2017).

    `x = linspace(-1, 1, w)[j]` (the column, left to right), `y = linspace(-1, 1, h)[i]` (the row, top to bottom);
    a side of one cell sits at -1.

    Returns:
        (h * w, 2) coordinates: token i * w + j is `[x_j, y_i]`.
    """
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype or torch.float32)  # (w,)
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype or torch.float32)  # (h,)
    return torch.stack([xs.repeat(h), ys.repeat_interleave(w)], dim=1)  # (h * w, 2)
