"""Task-kind contract: everything kind-specific about a prediction target lives in its `Task` class.

Shapes: B batch, C classes (or outputs).

A kind owns, in one file: its config options (the constructor's arguments after `name`), what it learns
from the training labels (`fit`, e.g. the classes), label parsing and validation (`encode`, one-line
`LabelError`s), label collation (`collate`: dtype, shape and the filler of a missing label), the head size
(`out_dim`), the loss, predictions, metrics, and how a prediction is serialised (`describe`) and shown
(`format`). The data path, the model, the trainer and `predict` never branch on a kind's name.

A label mask `(B,)` bool marks the samples that carry a label for the task; the loss and the metrics
only ever see those rows, so a masked label of any value (even NaN) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mmfuse.registry import Registry
from mmfuse.text import format_top  # noqa: F401  (the task kinds import it from here)

if TYPE_CHECKING:  # torchmetrics is imported by `metrics()` alone: predicting never needs it
    import torchmetrics

TASK_KINDS: Registry[type[Task]] = Registry("task kind")

MAX_LABEL_CHARS = 1000  # a class name longer than this is a mistake in the data (a pasted text), not a class


class LabelError(ValueError):
    """A raw label that a task cannot accept, as one line; the data layer adds the file and row."""


class Task:
    """One prediction target. Subclasses implement the kind-specific parts and register with `TASK_KINDS`.

    Args:
        name: the task's name (the key of its head and metrics).
        classes: class names, for kinds that have them.
        weight: the task's loss weight (equal/static weightings).

    Class attributes:
        kind: the registered name.
        default_metric: the metric that picks the best checkpoint by default (a key of `metrics()`).
        label_dtype: dtype of the collated labels.
        scores_classes: predictions are class probabilities with one true class (binary, multiclass), so
            `true_class_probability` is defined (modality balancers score modalities with it).
        example_labels: a few raw labels the kind accepts, together naming every class `fit` learns (at least
            two, distinct); the registry-wide tests (tests/test_tasks.py) build and exercise every kind from them.
    """

    kind: str = ""
    default_metric: str = ""
    label_dtype: torch.dtype = torch.float32
    scores_classes: bool = False
    example_labels: tuple[Any, ...] = ()

    def __init__(self, name: str, classes: list[str] | None = None, weight: float = 1.0) -> None:
        self.name = name
        self.classes = list(classes) if classes is not None else None
        self.weight = weight

    # ------------------------------------------------------------------ learned from the training labels
    @classmethod
    def fit(cls, labels: Sequence[Any], options: dict[str, Any]) -> dict[str, Any]:
        """Options learned from the training split's non-missing raw labels (e.g. {"classes": [...]}).

        They are added to the task's config options and written into the run's resolved config.yaml, so
        the config alone rebuilds the task. Return {} when the options already hold them, or when nothing is
        learned. Labels that `encode` would refuse are skipped here: validation names their file and row.

        Args:
            labels: the raw labels of the training records that have one.
            options: the task's config options so far (`classes`, kind-specific ones).
        """
        return {}

    # ------------------------------------------------------------------ labels
    @property
    def out_dim(self) -> int:
        """Outputs of the task's head."""
        raise NotImplementedError

    def encode(self, raw: Any) -> Any:
        """One raw label from a record (a JSON value or a CSV cell) -> the value `collate` takes.

        Raises:
            LabelError: one line saying why the label is refused.
        """
        raise NotImplementedError

    def filler(self) -> Any:
        """The encoded value that stands in for a missing label (masked out of losses and metrics)."""
        return 0

    def collate(self, values: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded labels, None where missing -> (labels (B,) or (B, C) of `label_dtype`, mask (B,) bool)."""
        mask = torch.tensor([v is not None for v in values], dtype=torch.bool)
        fill = self.filler()
        return torch.tensor([fill if v is None else v for v in values], dtype=self.label_dtype), mask

    # ------------------------------------------------------------------ training and evaluation
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of labelled rows: logits (N, out_dim), target as collated."""
        raise NotImplementedError

    def masked_loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean loss over labelled rows; a zero that keeps the graph when no row is labelled.

        One host read of the labelled count; a batch labelled throughout is not gathered (the same values, so the
        same loss, without two row selections and their syncs on an accelerator).
        """
        n = int(mask.sum())
        if n == 0:
            return logits.sum() * 0.0
        if n == len(mask):
            return self.loss(logits, target)
        return self.loss(logits[mask], target[mask])

    def metrics(self) -> torchmetrics.MetricCollection:
        """A fresh collection of this kind's metrics (`default_metric` among them)."""
        raise NotImplementedError

    def metric_input(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(preds, target) as `metrics()` takes them."""
        return logits, target

    def true_class_probability(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) probability given to the true class; only for kinds with `scores_classes`."""
        raise NotImplementedError(f"{self.kind} tasks have no true class")

    # ------------------------------------------------------------------ predictions
    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"prediction": (B,) or (B, C), "probabilities": (B, C) where the kind has them}.

        Every kind calls `check_finite(logits)` first: no prediction is ever made from NaN or infinite logits.
        """
        raise NotImplementedError

    def check_finite(self, logits: torch.Tensor) -> None:
        """Refuse a batch whose logits (B, C) hold NaN or an infinity (an input far outside the training data).

        Raises:
            DataError: one line (the CLI exits 2, the server answers 422); its `rows` are the batch positions of
                the records without a finite output.
        """
        finite = torch.isfinite(logits.detach()).reshape(logits.shape[0], -1).all(dim=1)  # (B,)
        if bool(finite.all()):
            return
        rows = (~finite).nonzero().flatten().tolist()
        raise non_finite_error(
            f"the model's output for task {self.name!r} is not finite (NaN or infinite) for {len(rows)} of "
            f"{logits.shape[0]} record(s), most often an input far outside the training data; no answer is given",
            rows,
        )

    def describe(self, pred: dict[str, torch.Tensor], i: int) -> dict[str, Any]:
        """Sample `i` of `predict`'s output as JSON-ready values, e.g. {"label": ..., "probabilities": {...}}.

        Keys the CLI, the server and the tests rely on: "probabilities" ({class: p} over every class, for kinds
        with classes) and "label", which, when given, is the class of highest probability (ties: the first).
        """
        raise NotImplementedError

    def format(self, described: dict[str, Any], top: int = 3) -> str:
        """One short line for the terminal from `describe`'s output (at most `top` classes shown)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": self.classes, "weight": self.weight}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, classes={self.classes})"


# ---------------------------------------------------------------------- helpers shared by the kinds
def non_finite_error(message: str, rows: list[int]) -> Exception:
    """A `DataError` (one line: exit 2 in the CLI, 422 from the server) whose `rows` are the batch positions.

    Imported on use: `mmfuse.data` imports this module, so it cannot import `mmfuse.data` at the top.
    """
    from mmfuse.data.records import DataError

    err = DataError(message)
    err.rows = rows  # type: ignore[attr-defined]
    return err


def require_classes(task: Task, minimum: int) -> list[str]:
    """The task's classes, checked: at least `minimum`, no duplicates, each a sane name."""
    if not task.classes or len(task.classes) < minimum:
        raise ValueError(f"task {task.name!r} ({task.kind}) needs at least {minimum} classes")
    if len(set(task.classes)) != len(task.classes):
        raise ValueError(f"task {task.name!r} has duplicate classes")
    return task.classes


def fit_classes(
    labels: Sequence[Any], options: dict[str, Any], names_of: Callable[[Any], Iterable[str]]
) -> dict[str, Any]:
    """{"classes": the sorted distinct names `names_of` finds in the labels} unless the config names them.

    Labels that `names_of` refuses are skipped: validation names their file and row.
    """
    if options.get("classes") is not None:
        return {}
    names: set[str] = set()
    for raw in labels:
        try:
            names.update(names_of(raw))
        except LabelError:
            continue
    return {"classes": sorted(names)}


def class_name(raw: Any) -> str:
    """A raw label as a class name: a string, number or bool (stripped); anything else is refused.

    Raises:
        LabelError: for objects, lists, and strings over `MAX_LABEL_CHARS` characters.
    """
    if isinstance(raw, dict):
        raise LabelError(f"label is an object ({_short(raw)}); expected a class name")
    if isinstance(raw, (list, tuple, set)):
        raise LabelError(f"label is a list ({_short(raw)}); expected one class name")
    if not isinstance(raw, (str, int, float, bool)):
        raise LabelError(f"label has type {type(raw).__name__}; expected a class name")
    text = str(raw).strip()
    if len(text) > MAX_LABEL_CHARS:
        raise LabelError(f"label is {len(text)} characters long (at most {MAX_LABEL_CHARS}): {text[:40]!r}...")
    return text


def describe_classes(classes: list[str], limit: int = 20) -> str:
    return ", ".join(classes[:limit]) + (f" ... ({len(classes)} classes)" if len(classes) > limit else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def build_task(name: str, kind: str, **options: Any) -> Task:
    """Build a task by kind name, e.g. `build_task("answer", "multiclass", classes=[...])`."""
    return TASK_KINDS.get(kind)(name, **options)
