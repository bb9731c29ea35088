"""Recipe: a tabular encoder over one numeric and one categorical column; both show the class."""

from pathlib import Path
from typing import Any

from recipes import Recipe

KINDS = ["low", "mid", "high"]


def table_row(i: int, root: Path, modality: str) -> dict[str, Any]:
    """The class as a number (with a missing cell every 5th sample) and as a category, nested under the field."""
    value = None if i % 5 == 4 else i % 3 + 0.1 * (i % 4)
    return {modality: {"size": value, "kind": KINDS[i % 3]}}


RECIPE = Recipe("tabular", {"numeric": ["size"], "categorical": ["kind"], "dim": 8, "heads": 2}, table_row)
