"""What each column of a table is: an image, a text, a table attribute, an embedding, or a label, and which
task kind a label column asks for. Shared by `MultiTaskPredictor.fit` and `mmfuse init`.

Rules (first match wins, per column; the user overrides any of them with `inputs={column: kind}`):
- a task's column is a label; its kind: lists, or strings of which some are "a|b" -> multilabel; booleans or two
  distinct values -> binary; floats with more than `max_classes` distinct values -> regression; anything else ->
  multiclass (more than `max_classes` distinct strings is refused: name the kind);
- strings ending in an image file extension -> `image` (each must name a regular file under the data root);
- lists or arrays of numbers, all of one length -> `embedding`;
- numbers (not booleans) -> `numeric` (a `tabular` attribute);
- booleans, and strings with at most `max_categories` distinct values and at most 3 words each -> `categorical`;
- other strings -> `text`.
Every numeric and categorical column goes to one `tabular` encoder named "table"; each image, text and embedding
column is a modality of its own, named after the column.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("image", "text", "numeric", "categorical", "embedding", "ignore")
TASK_KINDS = ("binary", "multiclass", "multilabel", "regression")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# The offline pretrained encoders of a default plan (the model packages that ship with mmfuse's dependencies).
IMAGE_ENCODER = {"name": "timm", "model": "tf_efficientnet_lite0", "weights": "packaged", "image_size": 128}
TEXT_ENCODER = {"name": "hf_text", "model": "minilm", "pooling": "mean", "max_length": 64}


class PlanError(ValueError):
    """A column that cannot be used as asked: one line naming the column."""


@dataclass
class InputPlan:
    """{column: kind} for the inputs, {task: kind} for the labels, and the data root file columns resolve against.

    `encoders()` gives the `model.encoders` section of a run config; `str(plan)` the plan as a user reads it.
    """

    columns: dict[str, str]
    tasks: dict[str, str]
    root: Path
    dims: dict[str, int] = field(default_factory=dict)  # an embedding column's vector size

    def encoders(self, freeze: bool = True) -> dict[str, dict[str, Any]]:
        """{modality: encoder options}: one per image, text and embedding column, one `tabular` for the rest."""
        out: dict[str, dict[str, Any]] = {}
        for column, kind in self.columns.items():
            if kind == "image":
                out[column] = {**IMAGE_ENCODER, "freeze": freeze, "field": column}
            elif kind == "text":
                out[column] = {**TEXT_ENCODER, "freeze": freeze, "field": column}
            elif kind == "embedding":
                out[column] = {"name": "embedding", "dim": self.dims[column], "field": column}
        numeric = [c for c, k in self.columns.items() if k == "numeric"]
        categorical = [c for c, k in self.columns.items() if k == "categorical"]
        if numeric or categorical:
            name = "table" if "table" not in out else "table_"
            out[name] = {"name": "tabular", **({"numeric": numeric} if numeric else {})}
            out[name] |= {"categorical": categorical} if categorical else {}
        return out

    def __str__(self) -> str:
        width = max(map(len, [*self.columns, *self.tasks, "column"]))
        lines = [f"{'column':<{width}}  use"]
        for column, kind in self.columns.items():
            extra = f" ({self.dims[column]} numbers)" if kind == "embedding" else ""
            lines.append(f"{column:<{width}}  {kind}{extra}")
        lines += [f"{task:<{width}}  label: {kind}" for task, kind in self.tasks.items()]
        return "\n".join(lines)


def plan_inputs(
    frame: Any,
    tasks: Sequence[str] | Mapping[str, str | None],
    inputs: Mapping[str, str] | None = None,
    root: str | os.PathLike[str] | None = None,
    max_classes: int = 50,
    max_categories: int = 20,
) -> InputPlan:
    """Decide every column's use from a pandas DataFrame (or a list of row dicts).

    Args:
        frame: the training table.
        tasks: the label columns, as a list (kinds inferred) or {column: kind or None}.
        inputs: {column: kind} overrides, kind one of image, text, numeric, categorical, embedding, ignore.
        root: the folder image paths are relative to (default: the current folder).
        max_classes: a label with more distinct values than this is regression (numbers) or refused (strings).
        max_categories: a string column with more distinct values than this is text.

    Raises:
        PlanError: a task column absent or with one class, an unknown kind, an image path that names no file, an
            embedding column of mixed lengths, no input column left.
    """
    rows = _rows(frame)
    columns = list(rows[0]) if rows else []
    task_kinds = dict(tasks) if isinstance(tasks, Mapping) else dict.fromkeys(tasks)
    root = Path(root or Path.cwd()).resolve()
    if not task_kinds:
        raise PlanError("tasks: name at least one label column")
    for task, kind in task_kinds.items():
        if task not in columns:
            raise PlanError(f"task column {task!r} is not in the data (columns: {', '.join(map(str, columns))})")
        if kind is not None and kind not in TASK_KINDS:
            raise PlanError(f"task {task!r}: unknown kind {kind!r}; choose one of {', '.join(TASK_KINDS)}")
    overrides = dict(inputs or {})
    for column, kind in overrides.items():
        if column not in columns:
            raise PlanError(f"inputs: column {column!r} is not in the data")
        if kind not in KINDS:
            raise PlanError(f"inputs: column {column!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    plan = InputPlan(columns={}, tasks={}, root=root)
    for task, kind in task_kinds.items():
        plan.tasks[task] = kind or task_kind(task, [r.get(task) for r in rows], max_classes)
    for column in columns:
        if column in task_kinds:
            continue
        values = [r.get(column) for r in rows]
        kind = overrides.get(column) or column_kind(column, values, max_categories)
        if kind == "ignore":
            continue
        if kind == "image":
            check_files(column, values, root)
        if kind == "embedding":
            plan.dims[column] = vector_length(column, values)
        plan.columns[column] = kind
    if not plan.columns:
        raise PlanError("no input column left: every column is a task or ignored")
    return plan


def _rows(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame or a list of dicts -> row dicts with missing values (NaN, None, NaT) as None."""
    if hasattr(frame, "to_dict") and hasattr(frame, "columns"):
        for column in frame.columns:
            if not isinstance(column, str):
                raise PlanError(f"column names must be strings; got {column!r}")
        rows = frame.to_dict(orient="records")
    else:
        rows = [dict(r) for r in frame]
    return [{k: None if is_missing(v) else v for k, v in r.items()} for r in rows]


def is_missing(value: Any) -> bool:
    """None, a float NaN, pandas' NA/NaT (a scalar that is not equal to itself)."""
    if value is None:
        return True
    if isinstance(value, list | tuple | np.ndarray | dict):
        return False
    try:
        return bool(value != value)
    except (TypeError, ValueError):
        return False


def present(values: Sequence[Any]) -> list[Any]:
    return [v for v in values if v is not None]


def task_kind(task: str, values: Sequence[Any], max_classes: int) -> str:
    """The kind a label column asks for (see the module docstring)."""
    seen = present(values)
    if not seen:
        raise PlanError(f"task column {task!r} holds no label")
    strings = all(isinstance(v, str) for v in seen)
    if all(isinstance(v, list | tuple | np.ndarray) for v in seen) or (strings and any("|" in v for v in seen)):
        return "multilabel"
    distinct = {v.item() if isinstance(v, np.generic) else v for v in seen}
    if len(distinct) < 2:
        raise PlanError(f"task column {task!r} holds one class only ({next(iter(distinct))!r}): nothing to learn")
    if all(isinstance(v, bool | np.bool_) for v in seen) or len(distinct) == 2:
        return "binary"
    numbers = all(isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) for v in seen)
    if numbers and (any(not float(v).is_integer() for v in distinct) or len(distinct) > max_classes):
        return "regression"
    if len(distinct) > max_classes:
        raise PlanError(
            f"task column {task!r} has {len(distinct)} distinct values, more than {max_classes} classes: "
            f"name its kind (tasks={{{task!r}: 'multiclass'}}) if that is meant"
        )
    return "multiclass"


def column_kind(column: str, values: Sequence[Any], max_categories: int) -> str:
    """An input column's kind (see the module docstring)."""
    seen = present(values)
    if not seen:
        raise PlanError(f"column {column!r} holds no value: drop it or pass inputs={{{column!r}: 'ignore'}}")
    if all(isinstance(v, list | tuple | np.ndarray) for v in seen):
        return "embedding"
    if all(isinstance(v, bool | np.bool_) for v in seen):
        return "categorical"
    if all(isinstance(v, int | float | np.integer | np.floating) for v in seen):
        return "numeric"
    if not all(isinstance(v, str) for v in seen):
        kinds = sorted({type(v).__name__ for v in seen})
        raise PlanError(f"column {column!r} mixes value types ({', '.join(kinds)}): give it one type")
    if all(v.strip().lower().endswith(IMAGE_SUFFIXES) for v in seen):
        return "image"
    if len(set(seen)) <= max_categories and all(len(v.split()) <= 3 for v in seen):
        return "categorical"
    return "text"


def check_files(column: str, values: Sequence[Any], root: Path) -> None:
    """Every image path of the column names a regular file under `root` (absolute paths are taken as they are)."""
    for i, value in enumerate(values):
        if value is None:
            continue
        path = Path(os.path.expanduser(str(value).strip()))
        full = path if path.is_absolute() else root / path
        if not full.is_file():
            raise PlanError(f"column {column!r}, row {i}: {value!r} names no file (looked for {full})")


def vector_length(column: str, values: Sequence[Any]) -> int:
    """The one length of an embedding column's vectors."""
    lengths = {len(v) for v in present(values)}
    if len(lengths) != 1:
        shown = sorted(lengths)[:5]
        raise PlanError(f"column {column!r} holds vectors of several lengths {shown}: embeddings need one")
    dim = lengths.pop()
    if dim < 1 or any(not _finite_numbers(v) for v in present(values)):
        raise PlanError(f"column {column!r}: every vector must hold {max(dim, 1)} finite numbers")
    return dim


def _finite_numbers(vector: Any) -> bool:
    try:
        return all(math.isfinite(float(x)) and not isinstance(x, bool | str) for x in vector)
    except (TypeError, ValueError):
        return False
