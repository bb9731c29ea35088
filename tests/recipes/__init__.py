"""Tiny recipes for the registry-wide tests: one file per registered encoder (`tests/recipes/<encoder>.py`).

Each file defines `RECIPE = Recipe(...)`: tiny, random-weight constructor options and a function that writes the
record fields of sample i (files under `root` when the input is file-backed). Sample i belongs to class i % 3,
and its input must show the class (a colour, a word, a value), so a tiny model can learn it.
The registry tests (tests/test_registry_e2e.py, tests/encoders/test_encoder_contract.py) fail for a registered
encoder without a recipe.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Recipe:
    """How to build one encoder tiny and make its inputs.

    Attributes:
        encoder: the registry name.
        options: constructor options (tiny sizes, random weights, no fitted options).
        row: row(i, root, modality) -> {field: value} for sample i (class i % 3); the field is `modality`, so
            with the default `field` the encoder reads it.
        extra: more options for the end-to-end configs (e.g. {"freeze": True}).
    """

    encoder: str
    options: dict[str, Any]
    row: Callable[[int, Path, str], dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


def load_recipes() -> dict[str, Recipe]:
    """{encoder name: Recipe} from every module of this package, then from each registered encoder's own file:
    a module-level `TEST_RECIPE = {"options": {...}, "row": row}` (optionally "extra") next to the class, so a
    new encoder (a plugin included) is one file."""
    import sys

    from mmfuse.encoders import ENCODERS

    out = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        recipe = getattr(module, "RECIPE", None)
        if recipe is not None:
            out[recipe.encoder] = recipe
    for name, cls in ENCODERS.items():
        declared = getattr(sys.modules[cls.__module__], "TEST_RECIPE", None)
        if name not in out and declared is not None:
            out[name] = Recipe(name, **declared)
    return out
