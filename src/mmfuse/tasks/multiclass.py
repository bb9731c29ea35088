"""Multiclass task: one of C named classes, cross-entropy."""

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


@TASK_KINDS.register("multiclass")
class MulticlassTask(Task):
    """One of C named classes, cross-entropy; classes are inferred from the training labels when not given.

    Args:
        name: the task's name.
        classes: the class names (at least 2).
        weight: the task's loss weight.
    """

    kind = "multiclass"
    default_metric = "accuracy"
    label_dtype = torch.long
    scores_classes = True
    example_labels = ("c", "a", "b")

    def __init__(self, name: str, classes: list[str] | None = None, weight: float = 1.0) -> None:
        super().__init__(name, classes, weight)
        require_classes(self, 2)
        self._index = {c: i for i, c in enumerate(self.classes)}

    @classmethod
    def fit(cls, labels: Sequence[Any], options: dict[str, Any]) -> dict[str, Any]:
        """{"classes": the sorted distinct label names} unless the config names the classes."""
        return fit_classes(labels, options, lambda raw: [class_name(raw)])

    @property
    def out_dim(self) -> int:
        return len(self.classes)

    def encode(self, raw: Any) -> int:
        key = class_name(raw)
        if key not in self._index:
            raise LabelError(
                f"label {key[:60]!r} is not one of the classes of task {self.name!r}: {describe_classes(self.classes)}"
            )
        return self._index[key]

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target.long())

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_finite(logits)
        p = logits.softmax(-1)
        return {"prediction": p.argmax(-1), "probabilities": p}

    def true_class_probability(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1).gather(1, target.long().reshape(-1, 1)).squeeze(1)

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics

        c = len(self.classes)
        return torchmetrics.MetricCollection(
            {
                "accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=c, average="micro"),
                "macro_f1": torchmetrics.F1Score(task="multiclass", num_classes=c, average="macro"),
            }
        )

    def describe(self, pred: dict[str, torch.Tensor], i: int) -> dict[str, Any]:
        probs = dict(zip(self.classes, pred["probabilities"][i].tolist()))
        return {"label": self.classes[int(pred["prediction"][i])], "probabilities": probs}

    def format(self, described: dict[str, Any], top: int = 3) -> str:
        return format_top(described["label"], described["probabilities"], top)
