"""`mmfuse init`: read a table (CSV or JSONL), decide each column's use with `mmfuse.infer.plan_inputs` (the same
inference as `MultiTaskPredictor.fit`) and write a commented YAML run config that `mmfuse train` trains as is.

Every section of the written config has a comment saying what was inferred and why, e.g.
`# review: free text (42 distinct values, up to 31 words) -> hf_text MiniLM`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmfuse.infer import IMAGE_ENCODER, InputPlan, PlanError, plan_inputs, present

SPLIT_NAMES = {"train", "val", "validation", "valid", "dev", "test"}  # records' split aliases
_INT = re.compile(r"[+-]?\d+")


@dataclass
class Draft:
    """The plan, the run config it gives (a plain dict) and that config as commented YAML."""

    plan: InputPlan
    config: dict[str, Any]
    why: dict[str, str]  # {column or task: the reason shown in the plan and above its entry}
    text: str


def read_table(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV or JSONL file, read by the records reader; CSV cells typed per column (numbers, booleans,
    blanks as None) the way the trainer will read them. Every row holds every column (None where absent)."""
    from mmfuse.data.records import DataError, read_rows

    header, numbered = read_rows(path)
    rows: list[dict[str, Any]] = []
    for number, row in numbered:
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: a row must be an object of column: value, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    columns = list(dict.fromkeys(c for r in rows for c in r))
    rows = [{c: r.get(c) for c in columns} for r in rows]
    return typed_cells(rows) if header is not None else rows


def typed_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CSV strings -> None (blank), bool (a column of true/false), int or float (a column of finite numbers)."""
    out = [{c: (v if v is None or v.strip() else None) for c, v in r.items()} for r in rows]
    for column in out[0]:
        cells = present([r[column] for r in out])
        convert = _converter([c.strip() for c in cells])
        if convert is not None:
            for r in out:
                r[column] = None if r[column] is None else convert(r[column].strip())
    return out


def _converter(cells: Sequence[str]) -> Any:
    if cells and all(c.lower() in ("true", "false") for c in cells):
        return lambda c: c.lower() == "true"
    if cells and all(_INT.fullmatch(c) for c in cells):
        return int
    try:
        if cells and all(math.isfinite(float(c)) for c in cells):
            return float
    except ValueError:
        pass
    return None


def draft_config(
    data: Path,
    tasks: Mapping[str, str | None],
    inputs: Mapping[str, str] | None = None,
    root: Path | None = None,
    command: str = "mmfuse init",
) -> Draft:
    """Read `data`, plan its columns and build the run config (`root`: where file paths resolve; default: the data
    file's folder, as `mmfuse train` reads it).

    Raises:
        DataError: the file is missing or unreadable.
        PlanError: a column that cannot be used as asked (see `plan_inputs`).
    """
    if root is not None and not root.is_dir():
        raise PlanError(f"--root {root}: not a folder")
    rows = read_table(data)
    data_root = (root or data.parent).resolve()
    overrides = dict(inputs or {})
    split = split_marker(rows, tasks, overrides)
    if split:
        overrides["split"] = "ignore"
    plan = plan_inputs(rows, tasks, overrides, data_root)
    why = {c: column_reason(c, k, [r.get(c) for r in rows], plan) for c, k in plan.columns.items()}
    why |= {t: task_reason(k, [r.get(t) for r in rows]) for t, k in plan.tasks.items()}
    for name in [*(t for t, k in tasks.items() if k), *(inputs or {})]:
        if name in why:
            why[name] += " (as given)"
    config = build_config(data, plan, rows, root, split)
    return Draft(plan, config, why, render(config, plan, why, rows, data, split, command))


def split_marker(rows: Sequence[Mapping[str, Any]], tasks: Mapping[str, Any], inputs: Mapping[str, str]) -> bool:
    """Whether a `split` column marks each row's split (train/val/test), as the records reader takes it."""
    if "split" not in rows[0] or "split" in tasks or "split" in inputs:
        return False
    values = present([r["split"] for r in rows])
    return bool(values) and all(isinstance(v, str) and v.strip().lower() in SPLIT_NAMES for v in values)


def build_config(
    data: Path, plan: InputPlan, rows: Sequence[Mapping[str, Any]], root: Path | None, split: bool
) -> dict[str, Any]:
    """The run config of the plan: frozen packaged encoders (cached features), concat fusion, the tasks, the file."""
    encoders = plan.encoders(freeze=True)
    section: dict[str, Any] = {"source": "records", "path": str(data.resolve())}
    if root is not None:
        section["root"] = str(root.resolve())
    if leaves_root(rows, plan):
        section["allow_outside_root"] = True
    if "split" in rows[0] and not split:
        section["split_field"] = ""  # the `split` column is an input or a task here, not a split marker
    if not split:
        section |= {"val_fraction": 0.1, "test_fraction": 0.1}
    section |= {"batch_size": 64}
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", data.stem).strip("_.") or "run"
    return {
        "name": name,
        "seed": 0,
        "model": {
            "encoders": encoders,
            "fusion": {"name": "concat", "output_dim": 256},
            "head": {"hidden_dims": [256], "dropout": 0.1},
        },
        "tasks": {t: {"kind": k} for t, k in plan.tasks.items()},
        "data": section,
        "train": {"max_epochs": 10, "early_stopping": {"patience": 3}, "lr": 0.001},
    }


def leaves_root(rows: Sequence[Mapping[str, Any]], plan: InputPlan) -> bool:
    """Whether an image path is absolute or climbs out of the data root (then the run must allow it)."""
    for column in (c for c, k in plan.columns.items() if k == "image"):
        for value in present([r.get(column) for r in rows]):
            path = Path(str(value).strip()).expanduser()
            full = (path if path.is_absolute() else plan.root / path).resolve()
            if path.is_absolute() or not full.is_relative_to(plan.root):
                return True
    return False


def column_reason(column: str, kind: str, values: Sequence[Any], plan: InputPlan) -> str:
    """Why a column has its use, and which encoder reads it."""
    seen = present(values)
    distinct = len({_hashable(v) for v in seen})
    missing = f", {len(values) - len(seen)} missing" if len(seen) < len(values) else ""
    if kind == "image":
        model = IMAGE_ENCODER["model"]
        return f"image paths ({distinct} distinct files{missing}) -> timm {model} (pretrained, packaged), frozen"
    if kind == "text":
        words = max(len(str(v).split()) for v in seen)
        return f"free text ({distinct} distinct values, up to {words} words{missing}) -> hf_text MiniLM, frozen"
    if kind == "embedding":
        return f"vectors of {plan.dims[column]} numbers{missing} -> embedding (passed through)"
    if kind == "numeric":
        low, high = min(map(float, seen)), max(map(float, seen))
        return f"numbers ({low:g} to {high:g}{missing}) -> tabular"
    shown = ", ".join(sorted(map(str, {_hashable(v) for v in seen}))[:5])
    return f"categories ({distinct} values: {shown}{', ...' if distinct > 5 else ''}{missing}) -> tabular"


def task_reason(kind: str, values: Sequence[Any]) -> str:
    """Why a label column has its task kind."""
    seen = present(values)
    distinct = sorted(map(str, {_hashable(v) for v in seen}))
    unlabelled = f"; {len(values) - len(seen)} rows unlabelled (masked)" if len(seen) < len(values) else ""
    if kind == "regression":
        low, high = min(map(float, seen)), max(map(float, seen))
        return f"numbers ({low:g} to {high:g}, {len(distinct)} distinct){unlabelled} -> regression"
    if kind == "multilabel":
        return f"label sets ({len(distinct)} distinct){unlabelled} -> multilabel"
    shown = ", ".join(distinct[:8]) + (", ..." if len(distinct) > 8 else "")
    return f"{len(distinct)} classes ({shown}){unlabelled} -> {kind}"


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def render(
    config: Mapping[str, Any],
    plan: InputPlan,
    why: Mapping[str, str],
    rows: Sequence[Any],
    data: Path,
    split: bool,
    command: str,
) -> str:
    """The config as YAML with a comment above each section (and each encoder and task) saying why."""
    model, tasks, section = config["model"], config["tasks"], config["data"]
    ignored = [c for c in rows[0] if c not in plan.columns and c not in plan.tasks and not (split and c == "split")]
    lines = [
        f"# Run config written by `{command}`",
        "# Review it, then: mmfuse train <this file>",
        "# Each comment says what was inferred from the data and why (the rules: mmfuse.infer); change any key.",
        *_dump({"name": config["name"], "seed": config["seed"]}),
        "",
        "# model: an encoder per image, text and embedding column; numeric and categorical columns share one `tabular`",
        "model:",
        "  encoders:",
    ]
    for name, options in model["encoders"].items():
        if options["name"] == "tabular":
            used = [*options.get("numeric", []), *options.get("categorical", [])]
            lines += [f"    # {c}: {_one(why[c])}" for c in used]
        else:
            lines.append(f"    # {name}: {_one(why[name])}")
        lines += _dump({name: options}, 4, flow=True)
    lines += [
        "  # fusion: concat (the default): the modalities' vectors side by side, then one linear layer;",
        "  # `mmfuse list` shows the other fusions, `mmfuse compare` ranks them on this data",
    ]
    lines += _dump({"fusion": model["fusion"], "head": model["head"]}, 2)
    lines += ["", "# tasks: one head each; a row without a task's label is left out of that task's loss", "tasks:"]
    for task, options in tasks.items():
        lines += [f"  # {task}: {_one(why[task])}", *_dump({task: options}, 2, flow=True)]
    where = f"under {section['root']}" if "root" in section else "under the data file's folder"
    how = "by the `split` column" if split else "at random, 10% val and 10% test (seeded, rows sharing a file together)"
    lines += [
        "",
        f"# data: {data.name} ({len(rows)} rows) by its absolute path (a relative one is read from where you train);",
        f"# file paths resolve {where}; rows split {how}",
    ]
    if section.get("allow_outside_root"):
        lines.append("# allow_outside_root: some image paths are absolute or leave that folder")
    if ignored:
        lines.append(f"# not used: {', '.join(map(str, ignored))}")
    lines += _dump({"data": section})
    lines += ["", "# train: frozen pretrained encoders, their features cached on disk; stop after 3 epochs without"]
    lines += ["# a better validation score", *_dump({"train": config["train"]})]
    text = "\n".join(lines) + "\n"
    if yaml.safe_load(text) != config:  # the comments never change what the config says
        raise AssertionError("mmfuse init: the written YAML differs from the planned config")
    return text


def _dump(mapping: Mapping[str, Any], indent: int = 0, flow: bool = False) -> list[str]:
    """YAML lines of `mapping` at `indent`; `flow`: each value on one line (`{name: timm, ...}`)."""
    style = None if flow else False
    text = yaml.safe_dump(dict(mapping), sort_keys=False, default_flow_style=style, width=1000, allow_unicode=True)
    return [" " * indent + line for line in text.splitlines()]


def _one(text: str) -> str:
    return " ".join(text.split())


def task_kinds(tasks: str, kinds: Mapping[str, str]) -> dict[str, str | None]:
    """`--tasks a,b` and `--kinds a=multiclass` -> {"a": "multiclass", "b": None} (None: inferred)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise PlanError("--tasks: name at least one label column, e.g. --tasks color,price")
    for task in kinds:
        if task not in names:
            raise PlanError(f"--kinds {task!r}: not one of --tasks ({', '.join(names)})")
    return {t: kinds.get(t) for t in names}


def parse_pairs(text: str | None, option: str) -> dict[str, str]:
    """`a=x,b=y` -> {"a": "x", "b": "y"}; PlanError naming the option for anything else."""
    pairs: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise PlanError(f"{option} {item.strip()!r}: expected COLUMN=KIND pairs separated by commas")
        pairs[key.strip()] = value.strip()
    return pairs
