"""Small helpers shared by several layers."""

from __future__ import annotations

from typing import Any

import torch


def move_to(obj: Any, device: torch.device | str) -> Any:
    """Move the tensors in nested dicts/lists to `device`; other objects are returned as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj
