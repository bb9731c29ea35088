"""The name table (`mmfuse.names`, read by `mmfuse list` and the config's name checks without importing torch)
agrees exactly with the registries once every component is imported."""

from __future__ import annotations

import importlib

import pytest

from mmfuse import registry
from mmfuse.names import BUILTIN, PACKAGES, Entry

for _package in sorted(set(PACKAGES.values())):
    importlib.import_module(_package)  # registers everything
LIVE = {kind: reg for kind, reg in registry._LIVE.items()}


def _line(name: str, obj: object) -> str:
    """The table line for a registered component, to paste into mmfuse/names.py."""
    return f"{name!r}: Entry({obj.__module__ + ':' + obj.__qualname__!r}, {registry.describe(obj)!r}),"


def test_every_registry_has_a_table_section_and_a_package() -> None:
    assert sorted(BUILTIN) == sorted(LIVE), "add the kind to mmfuse/names.py BUILTIN (or remove it there)"
    assert sorted(PACKAGES) == sorted(LIVE)
    for kind, package in PACKAGES.items():
        assert LIVE[kind].__class__ is registry.Registry
        assert any(obj.__module__.startswith(package + ".") for _, obj in LIVE[kind].items()), (kind, package)


@pytest.mark.parametrize("kind", sorted(BUILTIN))
def test_the_table_lists_exactly_the_registered_components(kind: str) -> None:
    registered = dict(LIVE[kind].items())
    missing = [_line(n, o) for n, o in registered.items() if n not in BUILTIN[kind]]
    assert not missing, f"add to mmfuse/names.py BUILTIN[{kind!r}]:\n" + "\n".join(missing)
    extra = sorted(set(BUILTIN[kind]) - set(registered))
    assert not extra, f"mmfuse/names.py lists {kind}s that nothing registers: {extra}"
    for name, obj in registered.items():
        want = Entry(f"{obj.__module__}:{obj.__qualname__}", registry.describe(obj))
        assert BUILTIN[kind][name] == want, f"update mmfuse/names.py:\n{_line(name, obj)}"


@pytest.mark.parametrize("kind", sorted(BUILTIN))
def test_each_target_names_the_registered_object(kind: str) -> None:
    for name, entry in BUILTIN[kind].items():
        module, _, attr = entry.target.partition(":")
        assert getattr(importlib.import_module(module), attr) is LIVE[kind].get(name)


def test_known_names_add_run_time_registrations(monkeypatch: pytest.MonkeyPatch) -> None:
    fusions = LIVE["fusion"]
    assert registry.known_names("fusion") == sorted(BUILTIN["fusion"])
    monkeypatch.setitem(fusions._items, "my_fusion", object)
    assert registry.known_names("fusion") == sorted([*BUILTIN["fusion"], "my_fusion"])
    assert registry.known_names("no such kind") == []
