"""Every component, by kind and name: where it lives and its one-line summary, found without importing it.

`mmfuse list` and the config's name checks (`registry.known_names`) read this table, so they answer without
importing torch. It is not kept by hand: `table()` reads the source of every module in the component packages
(and in the `MMFUSE_PLUGINS` folders, see `mmfuse.registry`) and collects each class decorated with
`@<REGISTRY>.register("name")`, where `<REGISTRY> = Registry("kind")` is assigned in one of those modules.
A class's summary is the first line of its docstring. tests/test_names.py checks that the table equals the
registries once everything is imported.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple


class Entry(NamedTuple):
    """Where a registered component lives and what it is."""

    target: str  # "package.module:ClassName"
    summary: str  # the first line of its docstring


# Kind (the registry's `kind` string) -> the package whose modules register its components.
PACKAGES: dict[str, str] = {
    "encoder": "mmfuse.encoders",
    "fusion": "mmfuse.fusion",
    "task kind": "mmfuse.tasks",
    "head": "mmfuse.tasks",
    "weighting": "mmfuse.mtl",
    "balancer": "mmfuse.balance",
}


def table() -> dict[str, dict[str, Entry]]:
    """{kind: {name: Entry}} for every kind in `PACKAGES`, built-in and plugin components alike.

    Raises:
        ConfigError: one line when a plugin folder is missing or a module in it is not valid Python.
    """
    from mmfuse.registry import package_dirs

    files: list[tuple[str, Path]] = []  # (module name, file), the first of each name wins (as on import)
    for package in sorted(set(PACKAGES.values())):
        seen: set[str] = set()
        spec = importlib.util.find_spec(package)
        own = list(spec.submodule_search_locations or []) if spec is not None else []
        for folder in package_dirs(package, own):
            for file in sorted(Path(folder).glob("*.py")):
                if file.stem != "__init__" and file.stem not in seen:
                    seen.add(file.stem)
                    files.append((f"{package}.{file.stem}", file))
    return _scan(tuple((module, str(file), file.stat().st_mtime_ns) for module, file in files))


def components(kind: str) -> dict[str, Entry]:
    """The components of `kind` ({} for a kind with none)."""
    return table().get(kind, {})


builtin = components  # the name this table had when it listed the built-in components only


def __getattr__(name: str) -> Any:
    if name == "BUILTIN":  # the whole table, read fresh (plugins may come and go)
        return table()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@lru_cache(maxsize=8)
def _scan(files: tuple[tuple[str, str, int], ...]) -> dict[str, dict[str, Entry]]:
    """The table from the modules' sources; cached per set of (module, file, modification time)."""
    kinds: dict[str, str] = {}  # registry variable -> kind
    found: list[tuple[str, str, Entry]] = []  # (registry variable, name, entry)
    for module, file, _ in files:
        tree = _parse(Path(file))
        for node in tree.body:
            kind = _registry_kind(node)
            if kind is not None:
                kinds[kind[0]] = kind[1]
            if isinstance(node, ast.ClassDef):
                summary = ((ast.get_docstring(node) or "").strip().splitlines() or [""])[0]
                for variable, name in _registrations(node):
                    found.append((variable, name, Entry(f"{module}:{node.name}", summary)))
    out: dict[str, dict[str, Entry]] = {kind: {} for kind in PACKAGES}
    for variable, name, entry in found:
        if variable in kinds:
            out.setdefault(kinds[variable], {}).setdefault(name, entry)
    return {kind: dict(sorted(entries.items())) for kind, entries in out.items()}


def _parse(file: Path) -> ast.Module:
    try:
        return ast.parse(file.read_bytes(), filename=str(file))
    except SyntaxError as err:
        from mmfuse.registry import plugin_error

        raise plugin_error(f"{file}: line {err.lineno}: not valid Python ({err.msg})") from None


def _registry_kind(node: ast.stmt) -> tuple[str, str] | None:
    """(variable, kind) for `VARIABLE = Registry("kind")` (annotated or not)."""
    target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
    if isinstance(node, ast.AnnAssign):
        target = node.target
    value = getattr(node, "value", None)
    if not (isinstance(target, ast.Name) and isinstance(value, ast.Call) and value.args):
        return None
    func, arg = value.func, value.args[0]
    called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    if called == "Registry" and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return target.id, arg.value
    return None


def _registrations(node: ast.ClassDef) -> list[tuple[str, str]]:
    """(registry variable, name) for each `@VARIABLE.register("name")` (or `@pkg.VARIABLE.register(...)`)."""
    out = []
    for deco in node.decorator_list:
        if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.args):
            continue
        owner, arg = deco.func.value, deco.args[0]
        variable = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
        if deco.func.attr == "register" and variable and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            out.append((variable, arg.value))
    return out
