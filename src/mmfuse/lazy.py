"""Names of a package imported on first use: a module's `__getattr__` over a table of {name: module}.

`mmfuse/__init__.py` and `mmfuse/data/__init__.py` use it so that importing them stays fast and torch-free; the
table is the package's `__all__`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: `name` in `table` is imported from `table[name]` when asked for."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
