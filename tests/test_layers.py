"""The layers of docs/architecture.md, checked on the sources: who may import whom (module level or inside a
function; imports for type hints only and `__main__` blocks do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "mmfuse"
COMPONENTS = ("encoders", "fusion", "tasks", "mtl", "balance")
ABOVE_COMPONENTS = {
    "model", "builders", "config", "train", "cli", "workbench", "serve", "export", "predict", "predictor", "runs",
    "bench", "multirun", "pack", "infer", "init_config", "datasets",
}  # fmt: skip


def _skipped(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (type hints only) and `if __name__ == "__main__":` (a script's entry point)."""
    if not isinstance(node, ast.If):
        return False
    test = ast.unparse(node.test)
    return "TYPE_CHECKING" in test or "__main__" in test


def imports(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names (`mmfuse.data.records`, `lightning.pytorch`)."""
    found: set[str] = set()

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _skipped(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names if child.module == "mmfuse")
            walk(child)

    walk(ast.parse(path.read_text()))
    return found


def unit(path: Path) -> str:
    """The package (`fusion`) or top-level module (`builders`) of a source file."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def mmfuse_units(names: set[str]) -> set[str]:
    return {n.split(".")[1] for n in names if n.startswith("mmfuse.")}


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", [p for p in FILES if unit(p) in COMPONENTS], ids=lambda p: str(p.relative_to(SRC)))
def test_components_never_import_upward(path: Path) -> None:
    names = imports(path)
    allowed = {"mmfuse.data.records"} if unit(path) == "tasks" else set()  # the DataError it raises
    upward = {n for n in names if n.startswith("mmfuse.") and n not in allowed}
    assert not mmfuse_units(upward) & (ABOVE_COMPONENTS | {"data"}), sorted(upward)


def test_the_model_imports_only_components_and_leaves() -> None:
    assert mmfuse_units(imports(SRC / "model.py")) <= {"encoders", "fusion", "tasks", "registry", "text", "utils"}


@pytest.mark.parametrize("path", [p for p in FILES if unit(p) == "data"], ids=lambda p: str(p.relative_to(SRC)))
def test_the_data_layer_never_imports_the_model_builders_or_trainer(path: Path) -> None:
    assert not mmfuse_units(imports(path)) & (ABOVE_COMPONENTS - {"datasets"}), sorted(imports(path))


def test_lightning_is_imported_by_the_trainer_only() -> None:
    users = {str(p.relative_to(SRC)) for p in FILES if any(n.split(".")[0] == "lightning" for n in imports(p))}
    # cli.py and predictor.py import it only to quiet its loggers before they call the trainer
    assert {u for u in users if not u.startswith("train/")} <= {"cli.py", "predictor.py"}, sorted(users)


@pytest.mark.parametrize("name", ["predict.py", "runs.py", "serve"])
def test_prediction_and_serving_never_import_the_trainer(name: str) -> None:
    paths = sorted((SRC / name).rglob("*.py")) if (SRC / name).is_dir() else [SRC / name]
    for path in paths:
        assert "train" not in mmfuse_units(imports(path)), path
