"""Builders are the only readers of the run config: outside `mmfuse.config` and `mmfuse.builders`, no module of mmfuse
reads a field of a `RunConfig` (name, seed, model, tasks, data, train) except to hand a section straight to a
`build_*` builder. A config object may be kept and handed on whole (a loaded run keeps it for the builders); what the
commands around a run ask of it comes from `mmfuse.builders.run_outline`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from mmfuse.builders import run_outline
from mmfuse.cli import main
from mmfuse.config import RunConfig, parse_config
from tiny import run_config, write_dataset

SRC = Path(__file__).parents[1] / "src" / "mmfuse"
READERS = {"config.py", "builders.py"}  # the package's own top-level modules that may read it
FIELDS = set(RunConfig.model_fields)
CONFIG_NAMES = {"cfg", "config"}  # what a run config is called where nothing annotates it


def _mentions_config(node: ast.AST | None) -> bool:
    return node is not None and "RunConfig" in ast.unparse(node)


def _called(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def config_signatures(trees: list[ast.Module]) -> tuple[set[str], set[str]]:
    """(functions that return a RunConfig, attributes that hold one: class fields annotated RunConfig)."""
    producers: set[str] = set()
    holders = set(CONFIG_NAMES)
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _mentions_config(node.returns):
                producers.add(node.name)
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        if _mentions_config(stmt.annotation):
                            holders.add(stmt.target.id)
    return producers, holders


class _Reads(ast.NodeVisitor):
    """Field reads of a run config in one module, scope by scope (a name is a config where its function says so)."""

    def __init__(self, producers: set[str], holders: set[str]) -> None:
        self.producers, self.holders = producers, holders
        self.scopes: list[set[str]] = []
        self.handed: set[int] = set()
        self.reads: list[tuple[int, str]] = []

    def _names(self, node: ast.AST, args: ast.arguments | None) -> set[str]:
        names = set(CONFIG_NAMES)
        if args is not None:
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            names |= {a.arg for a in every if a is not None and _mentions_config(a.annotation)}
        for sub in ast.walk(node):
            if isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name) and _mentions_config(sub.annotation):
                names.add(sub.target.id)
            if isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Call) and _called(sub.value) in self.producers:
                names |= {t.id for t in sub.targets if isinstance(t, ast.Name)}
        return names

    def _scope(self, node: ast.AST, args: ast.arguments | None) -> None:
        self.scopes.append(self._names(node, args))
        self.generic_visit(node)
        self.scopes.pop()

    def visit_Module(self, node: ast.Module) -> None:
        self._scope(node, None)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scope(node, node.args)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Call(self, node: ast.Call) -> None:
        if _called(node).startswith("build_"):  # a section handed straight to a builder
            self.handed |= {id(sub) for arg in [*node.args, *(k.value for k in node.keywords)] for sub in ast.walk(arg)}
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in FIELDS and id(node) not in self.handed and self._is_config(node.value):
            self.reads.append((node.lineno, ast.unparse(node)))
        self.generic_visit(node)

    def _is_config(self, base: ast.AST) -> bool:
        if isinstance(base, ast.Name):
            return any(base.id in names for names in self.scopes)
        if isinstance(base, ast.Attribute):
            return base.attr in self.holders
        return isinstance(base, ast.Call) and _called(base) in self.producers


def config_reads(sources: dict[str, str]) -> list[str]:
    """`file:line: expression` for every field read of a run config in `sources` ({file name: its text})."""
    trees = {name: ast.parse(text) for name, text in sources.items()}
    producers, holders = config_signatures(list(trees.values()))
    out = []
    for name, tree in trees.items():
        visitor = _Reads(producers, holders)
        visitor.visit(tree)
        out += [f"{name}:{line}: {expr}" for line, expr in sorted(visitor.reads)]
    return out


def package_sources(root: Path = SRC) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.py"))}


def test_no_module_outside_the_builders_reads_the_run_config() -> None:
    sources = package_sources()
    assert {"runs.py", "cli.py", "bench.py", "serve/server.py", "workbench/explain.py"} <= set(sources)
    reads = [r for r in config_reads(sources) if r.split(":")[0] not in READERS]
    assert reads == []


def test_the_check_finds_each_way_a_config_is_read() -> None:
    source = """
from mmfuse.config import RunConfig, load_config

class Held:
    base: RunConfig

def resolved(path) -> RunConfig:
    return load_config(path)

def reads(cfg, run, plan: Held, other: RunConfig, comp):
    a = cfg.train.lr
    b = run.config.model.fusion.name
    c = plan.base.seed
    d = other.tasks
    e = resolved("x").name
    loaded = resolved("y")
    f = loaded.data
    return comp.name, build_tasks(cfg.tasks), cfg.model_dump()
"""
    assert [r.split(": ", 1)[1] for r in config_reads({"m.py": source})] == [
        "cfg.train",
        "run.config.model",
        "plan.base.seed",
        "other.tasks",
        "resolved('x').name",
        "loaded.data",
    ]


def test_the_run_outline_carries_what_the_commands_ask(tmp_path: Path) -> None:
    raw = run_config(tmp_path / "r.jsonl", max_epochs=3)
    raw.update(name="outlined", seed=7)
    raw["train"]["weighting"] = {"name": "uncertainty"}
    cfg = parse_config(raw)
    outline = run_outline(cfg)
    assert (outline.name, outline.seed, outline.max_epochs, outline.weighting) == ("outlined", 7, 3, "uncertainty")
    assert outline.tasks == {n: tc.kind for n, tc in cfg.tasks.items()} and list(outline.tasks) == list(cfg.tasks)
    assert outline.fusion == cfg.model.fusion


def test_train_without_out_names_the_run_directory_after_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI takes the run's name from `run_outline`: `train` without --out lands in runs/<name>-<date>-<time>."""
    raw = run_config(write_dataset(tmp_path / "data", n=16), max_epochs=1)
    raw["name"] = "outlined"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "c.yaml"]) == 0
    made = [p.name for p in (tmp_path / "runs").iterdir()]
    assert len(made) == 1 and re.fullmatch(r"outlined-\d{8}-\d{6}", made[0]), made
    assert f"run directory: runs/{made[0]}" in capsys.readouterr().out
