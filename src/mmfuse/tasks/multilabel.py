"""Multilabel task: any subset of C named labels, one BCE logit each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmfuse.tasks.base import (
    TASK_KINDS,
    LabelError,
    Task,
    class_name,
    describe_classes,
    fit_classes,
    format_top,
    require_classes,
)

if TYPE_CHECKING:  # torchmetrics is imported by `metrics()` alone: predicting never needs it
    import torchmetrics


def label_names(raw: Any) -> list[str]:
    """A raw multilabel value -> its label names: a list (JSON) or a "a|b" string (CSV).

    Raises:
        LabelError: for an object, a nested list or object, or an over-long name.
    """
    if isinstance(raw, str):
        return [class_name(s) for s in raw.split("|") if s.strip()]
    if isinstance(raw, (list, tuple)):
        return [class_name(v) for v in raw]
    if isinstance(raw, dict):
        raise LabelError("label is an object; expected a list of names or 'a|b'")
    return [class_name(raw)]


@TASK_KINDS.register("multilabel")
class MultilabelTask(Task):
    """Any subset of C named labels, one BCE logit each; a raw label is a list or a "a|b" string.

    Args:
        name: the task's name.
        classes: the label names (at least 1); inferred from the training labels when not given.
        weight: the task's loss weight.
    """

    kind = "multilabel"
    default_metric = "macro_f1"
    example_labels = ("x|z", ["y"], "x")

    def __init__(self, name: str, classes: list[str] | None = None, weight: float = 1.0) -> None:
        super().__init__(name, classes, weight)
        require_classes(self, 1)
        self._index = {c: i for i, c in enumerate(self.classes)}

    @classmethod
    def fit(cls, labels: Sequence[Any], options: dict[str, Any]) -> dict[str, Any]:
        """{"classes": the sorted distinct label names} unless the config names the classes."""
        return fit_classes(labels, options, label_names)

    @property
    def out_dim(self) -> int:
        return len(self.classes)

    def encode(self, raw: Any) -> list[float]:
        vec = [0.0] * len(self.classes)
        for n in label_names(raw):
            if n not in self._index:
                raise LabelError(
                    f"label {n[:60]!r} is not one of the classes of task {self.name!r}: "
                    f"{describe_classes(self.classes)}"
                )
            vec[self._index[n]] = 1.0
        return vec

    def filler(self) -> list[float]:
        return [0.0] * len(self.classes)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target.float())

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_finite(logits)
        p = torch.sigmoid(logits)
        return {"prediction": (p > 0.5).long(), "probabilities": p}

    def metric_input(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(logits), target.long()

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics

        c = len(self.classes)
        return torchmetrics.MetricCollection(
            {
                "accuracy": torchmetrics.Accuracy(task="multilabel", num_labels=c),
                "macro_f1": torchmetrics.F1Score(task="multilabel", num_labels=c, average="macro"),
            }
        )

    def describe(self, pred: dict[str, torch.Tensor], i: int) -> dict[str, Any]:
        on = pred["prediction"][i].tolist()
        return {
            "labels": [c for c, flag in zip(self.classes, on) if flag],
            "probabilities": dict(zip(self.classes, pred["probabilities"][i].tolist())),
        }

    def format(self, described: dict[str, Any], top: int = 3) -> str:
        return format_top(described["labels"], described["probabilities"], top)
