"""One small registry used by every extension point (encoders, fusions, task kinds, weightings, balancers).

The built-in components are also listed, with their module and summary, in `mmfuse.names`, so the names a
config may use are known before any implementation (and torch) is imported: `known_names(kind)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from mmfuse.names import builtin

T = TypeVar("T")

_LIVE: dict[str, Registry[Any]] = {}  # kind -> the registry of that kind, once its module is imported


class Registry(Generic[T]):
    """Maps snake_case names to classes (or factories) of one kind.

    Example:
        >>> FUSIONS = Registry("fusion")
        >>> @FUSIONS.register("concat")
        ... class ConcatFusion(nn.Module): ...
        >>> FUSIONS.get("concat")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        _LIVE[kind] = self

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def known_names(kind: str) -> list[str]:
    """The names a config may use for `kind`, importing nothing: the built-ins listed in `mmfuse.names`, plus
    whatever was registered at run time through the Python API (its registry is imported by then)."""
    live = _LIVE.get(kind)
    return sorted(set(builtin(kind)) | set(live.names() if live is not None else ()))


def describe(obj: Any) -> str:
    """First line of an object's docstring (what `mmfuse.names` lists as a component's summary)."""
    doc = (obj.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
