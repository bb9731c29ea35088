"""The name table (`mmfuse.names`, read by `mmfuse list` and the config's name checks without importing torch) is
found in the component folders' sources and agrees exactly with the registries once every component is imported;
a folder in `MMFUSE_PLUGINS` adds its components to it, still without importing them."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from mmfuse import registry
from mmfuse.config import ConfigError
from mmfuse.names import PACKAGES, Entry, table

for _package in sorted(set(PACKAGES.values())):
    importlib.import_module(_package)  # registers everything
LIVE = {kind: reg for kind, reg in registry._LIVE.items()}
TABLE = table()


def test_every_registry_has_a_table_section_and_a_package() -> None:
    assert sorted(TABLE) == sorted(LIVE), "add the kind to mmfuse/names.py PACKAGES (or remove it there)"
    assert sorted(PACKAGES) == sorted(LIVE)
    for kind, package in PACKAGES.items():
        assert LIVE[kind].__class__ is registry.Registry
        assert any(obj.__module__.startswith(package + ".") for _, obj in LIVE[kind].items()), (kind, package)


@pytest.mark.parametrize("kind", sorted(PACKAGES))
def test_the_table_lists_exactly_the_registered_components(kind: str) -> None:
    registered = dict(LIVE[kind].items())
    assert sorted(TABLE[kind]) == sorted(registered)
    for name, obj in registered.items():
        assert TABLE[kind][name] == Entry(f"{obj.__module__}:{obj.__qualname__}", registry.describe(obj))
        assert TABLE[kind][name].summary, f"{kind} {name!r}: the first docstring line is what `mmfuse list` shows"


@pytest.mark.parametrize("kind", sorted(PACKAGES))
def test_each_target_names_the_registered_object(kind: str) -> None:
    for name, entry in TABLE[kind].items():
        module, _, attr = entry.target.partition(":")
        assert getattr(importlib.import_module(module), attr) is LIVE[kind].get(name)


def test_known_names_add_run_time_registrations(monkeypatch: pytest.MonkeyPatch) -> None:
    fusions = LIVE["fusion"]
    assert registry.known_names("fusion") == sorted(TABLE["fusion"])
    monkeypatch.setitem(fusions._items, "my_fusion", object)
    assert registry.known_names("fusion") == sorted([*TABLE["fusion"], "my_fusion"])
    assert registry.known_names("no such kind") == []


PLUGIN = '''
from mmfuse.fusion import FUSIONS
from mmfuse.fusion.sum import SumFusion


@FUSIONS.register("doubled_sum")
class DoubledSum(SumFusion):
    """Twice the sum fusion.

    More text.
    """
'''


def test_a_plugin_folder_is_listed_without_importing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fusion").mkdir()
    (tmp_path / "fusion" / "doubled.py").write_text(PLUGIN)
    monkeypatch.setenv(registry.PLUGINS_ENV, str(tmp_path))
    entry = table()["fusion"]["doubled_sum"]
    assert entry == Entry("mmfuse.fusion.doubled:DoubledSum", "Twice the sum fusion.")
    assert "doubled_sum" in registry.known_names("fusion") and "mmfuse.fusion.doubled" not in sys.modules
    monkeypatch.delenv(registry.PLUGINS_ENV)
    assert "doubled_sum" not in table()["fusion"]


@pytest.mark.parametrize(
    ("layout", "words"),
    [
        ({}, "holds none of the component folders balance/, encoders/, fusion/, mtl/, tasks/"),
        ({"fusion/bad.py": "class (:\n"}, "bad.py: line 1: not valid Python"),
    ],
)
def test_a_bad_plugin_folder_is_one_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: dict[str, str], words: str
) -> None:
    for rel, text in layout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setenv(registry.PLUGINS_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="MMFUSE_PLUGINS: ") as info:
        table()
    assert words in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv(registry.PLUGINS_ENV, str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="nope: not a folder"):
        table()


def test_a_plugin_that_fails_to_import_is_one_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmfuse.fusion

    (tmp_path / "fusion").mkdir()
    (tmp_path / "fusion" / "boom.py").write_text("raise RuntimeError('no luck\\nsecond line')\n")
    monkeypatch.setattr(mmfuse.fusion, "__path__", list(mmfuse.fusion.__path__))  # restored afterwards
    monkeypatch.setenv(registry.PLUGINS_ENV, str(tmp_path))
    with pytest.raises(ConfigError) as info:
        registry.import_components("mmfuse.fusion")
    assert (
        str(info.value) == f"MMFUSE_PLUGINS: {tmp_path / 'fusion' / 'boom.py'}: cannot import it: RuntimeError: no luck"
    )
    assert "mmfuse.fusion.boom" not in sys.modules


def test_mmfuse_list_answers_a_bad_plugin_folder_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from mmfuse.cli import main

    monkeypatch.setenv(registry.PLUGINS_ENV, str(tmp_path / "missing"))
    assert main(["list"]) == 2
    out, err = capsys.readouterr()
    assert (
        out == ""
        and err.strip().endswith(f"MMFUSE_PLUGINS: {tmp_path / 'missing'}: not a folder")
        and "\n" not in err.strip()
    )


def test_a_plugin_file_named_like_a_built_in_module_is_one_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fusion/sum.py` in a plugin folder would be shadowed by mmfuse.fusion.sum and never imported: refused."""
    import mmfuse.fusion

    (tmp_path / "fusion").mkdir()
    (tmp_path / "fusion" / "sum.py").write_text("raise RuntimeError('never imported')\n")
    monkeypatch.setattr(mmfuse.fusion, "__path__", list(mmfuse.fusion.__path__))  # restored afterwards
    monkeypatch.setenv(registry.PLUGINS_ENV, str(tmp_path))
    with pytest.raises(ConfigError) as info:
        registry.import_components("mmfuse.fusion")
    assert str(info.value) == (
        f"MMFUSE_PLUGINS: {tmp_path / 'fusion' / 'sum'}.py: has the name of the built-in module mmfuse.fusion.sum, "
        "so it would never be imported; rename the file"
    )
