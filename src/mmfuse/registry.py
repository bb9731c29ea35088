"""One small registry used by every extension point (encoders, fusions, task kinds, weightings, balancers).

A component is one file: a class registered with `@REGISTRY.register("name")` in a module of its package
(`mmfuse/fusion/`, `encoders/`, `tasks/`, `mtl/`, `balance/`), so nothing else lists it. Modules are imported
when first needed: `REGISTRY.get("name")` (and `"name" in REGISTRY`) imports the one module that registers that
name, found in the name table below without importing anything; `names()` and `items()` import every module of
the package (`import_components` too). So `mmfuse predict` on an image + text run never imports the tabular
encoder or the relation fusion (nor timm for a run without a timm encoder). Folders named in the environment
variable `MMFUSE_PLUGINS` (separated like PATH) extend those packages: `<folder>/fusion/my_fusion.py` is imported
as `mmfuse.fusion.my_fusion` next to the built-in ones.

`mmfuse.names` reads the same folders without importing them (no torch), so `mmfuse list` and the config's
name checks (`known_names`) see every component, plugins included.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable, MutableSequence
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

PLUGINS_ENV = "MMFUSE_PLUGINS"
_LIVE: dict[str, Registry[Any]] = {}  # kind -> the registry of that kind, once its module is imported
_OWN: dict[str, list[str]] = {}  # package -> its own folders (its `__path__` before the plugin folders are added)
_PENDING: set[str] = set()  # the packages some of whose modules may not be imported yet


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
            self._load(name)
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._items.items())

    def registered(self) -> list[str]:
        """The names registered so far, importing nothing (`names()` imports every module of the package)."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name not in self._items:
            self._load(name)
        return name in self._items

    def _load(self, name: str | None = None) -> None:
        """Import the module that registers `name` (found in `mmfuse.names`' table); every module of the package
        when `name` is None or not found there (a component registered from an unexpected module)."""
        from mmfuse.names import PACKAGES, components

        package = PACKAGES.get(self.kind)
        if package is None or package not in _PENDING:
            return
        path = importlib.import_module(package).__path__
        if name is not None:
            entry = components(self.kind).get(name)
            module = entry.target.partition(":")[0] if entry is not None else ""
            if module.startswith(package + "."):
                import_modules(package, path)  # the plugin folders of now
                _import_one(package, module.rpartition(".")[2], _OWN[package])
                if name in self._items:
                    return
        import_modules(package, path, lazy=False)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def plugin_error(message: str) -> ValueError:
    """A one-line `ConfigError` about the plugin folders (imported here: `mmfuse.config` imports this module)."""
    from mmfuse.config import ConfigError

    return ConfigError(f"{PLUGINS_ENV}: {message}")


def plugin_dirs() -> list[Path]:
    """The folders named in `MMFUSE_PLUGINS`, checked: each exists and holds a component folder.

    Raises:
        ConfigError: one line naming the folder that is missing or holds no component folder.
    """
    from mmfuse.names import PACKAGES

    leaves = sorted({package.rpartition(".")[2] for package in PACKAGES.values()})
    out = []
    for entry in os.environ.get(PLUGINS_ENV, "").split(os.pathsep):
        if not entry.strip():
            continue
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            raise plugin_error(f"{entry}: not a folder")
        if not any((folder / leaf).is_dir() for leaf in leaves):
            raise plugin_error(f"{entry}: holds none of the component folders {', '.join(f + '/' for f in leaves)}")
        out.append(folder)
    return out


def package_dirs(package: str, own: list[str]) -> list[str]:
    """`own` (the package's folders) plus `<plugin folder>/<last part of package>` for each plugin folder."""
    leaf = package.rpartition(".")[2]
    extra = [str(d / leaf) for d in plugin_dirs() if (d / leaf).is_dir()]
    extra = [d for d in extra if d not in own]
    taken = {info.name: own for info in pkgutil.iter_modules(own)}
    for folder in extra:  # a module name already taken would be shadowed: never imported, silently
        for info in pkgutil.iter_modules([folder]):
            if info.name in taken:
                first = "the built-in module" if taken[info.name] is own else f"the plugin in {taken[info.name]}"
                raise plugin_error(
                    f"{Path(folder, info.name)}.py: has the name of {first} {package}.{info.name}, so it would never "
                    "be imported; rename the file"
                )
            taken[info.name] = [folder]
    return [*own, *extra]


def import_modules(package: str, path: MutableSequence[str], lazy: bool = True) -> None:
    """Extend `package`'s `__path__` in place by the plugin folders and import its modules, which registers them:
    each on first use (`Registry.get`) when `lazy`, else all now. Safe to call again (after `MMFUSE_PLUGINS`
    changed, already imported modules are kept).

    Raises:
        ConfigError: one line when a plugin folder is bad or (not `lazy`) a plugin module cannot be imported.
    """
    own = _OWN.setdefault(package, list(path))
    path[:] = package_dirs(package, own)
    _PENDING.add(package)
    if lazy:
        return
    for info in pkgutil.iter_modules(path):
        _import_one(package, info.name, own)
    _PENDING.discard(package)


def _import_one(package: str, leaf: str, own: list[str]) -> None:
    """Import `package.leaf`; a plugin module (one outside `own`) that fails is one `ConfigError` line."""
    name = f"{package}.{leaf}"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    folder = str(Path(spec.origin).parent) if spec is not None and spec.origin else own[0]
    if folder in own:
        importlib.import_module(name)
        return
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001  (a plugin's own failure, reported as one line)
        sys.modules.pop(name, None)
        text = (str(err).strip().splitlines() or [""])[0]
        raise plugin_error(f"{Path(folder, leaf + '.py')}: cannot import it: {type(err).__name__}: {text}") from None


def import_components(package: str) -> None:
    """Import `package` and every module of it now, plugins included (again, after `MMFUSE_PLUGINS` changed)."""
    module = importlib.import_module(package)
    import_modules(package, module.__path__, lazy=False)


def known_names(kind: str) -> list[str]:
    """The names a config may use for `kind`, importing nothing: every component `mmfuse.names` finds in the
    package and plugin folders, plus whatever was registered at run time through the Python API."""
    from mmfuse.names import components

    live = _LIVE.get(kind)
    return sorted(set(components(kind)) | set(live.registered() if live is not None else ()))


def describe(obj: Any) -> str:
    """First line of an object's docstring (what `mmfuse list` shows as a component's summary)."""
    doc = (obj.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
