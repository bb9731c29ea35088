"""Binary task: two classes, one logit, BCE-with-logits; the class names are learned from the training labels."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmfuse.tasks.base import TASK_KINDS, LabelError, Task, class_name, format_top

if TYPE_CHECKING:  # torchmetrics is imported by `metrics()` alone: predicting never needs it
    import torchmetrics

_TRUTHY = {"1", "true", "yes", "1.0"}
_FALSY = {"0", "false", "no", "0.0"}


@TASK_KINDS.register("binary")
class BinaryTask(Task):
    """Two classes, one logit, BCE-with-logits; labels 0/1, true/false, yes/no or the two class names.

    The classes are learned from the training labels when the config leaves them out (`fit`): `yes`/`no` or
    `spam`/`ham` data is answered with `yes`/`no` or `spam`/`ham`, not 0/1.

    Args:
        name: the task's name.
        classes: the two class names (negative first); default ["0", "1"].
        weight: the task's loss weight.
    """

    kind = "binary"
    default_metric = "auroc"
    scores_classes = True
    example_labels = ("1", "0", "true", False)

    def __init__(self, name: str, classes: list[str] | None = None, weight: float = 1.0) -> None:
        super().__init__(name, classes or ["0", "1"], weight)
        if len(self.classes) != 2 or self.classes[0] == self.classes[1]:
            raise ValueError(f"task {name!r} (binary) needs exactly 2 distinct classes, got {self.classes}")

    @classmethod
    def fit(cls, labels: Sequence[Any], options: dict[str, Any]) -> dict[str, Any]:
        """{"classes": [negative, positive]} from the training labels unless the config names the classes.

        Two names that are not 0/1/true/false/yes/no are the classes, sorted (so `ham`, `spam`). Otherwise the
        most common false-like and true-like spellings are (`no`, `yes`; `false`, `true`; `0`, `1`), false
        first. Anything else (one class, three names) keeps the default ["0", "1"]: validation then names the
        rows it cannot read.
        """
        if options.get("classes") is not None:
            return {}
        counts: Counter[str] = Counter()
        for raw in labels:
            try:
                counts[str(raw).lower() if isinstance(raw, bool) else class_name(raw)] += 1
            except LabelError:
                continue
        words = [n for n in counts if n.lower() not in _TRUTHY | _FALSY]
        if len(words) == 2:
            return {"classes": sorted(words)}
        if words:
            return {}
        falsy = [n for n, _ in counts.most_common() if n.lower() in _FALSY]
        truthy = [n for n, _ in counts.most_common() if n.lower() in _TRUTHY]
        return {"classes": [falsy[0], truthy[0]]} if falsy and truthy else {}

    @property
    def out_dim(self) -> int:
        return 1

    def encode(self, raw: Any) -> float:
        text = class_name(raw)
        if text in self.classes:
            return float(self.classes.index(text))
        if isinstance(raw, bool) or text.lower() in _TRUTHY | _FALSY:
            return 1.0 if text.lower() in _TRUTHY else 0.0
        raise LabelError(f"label {text[:60]!r} is not one of {self.classes} or 0/1/true/false")

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), target.float())

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_finite(logits)
        p = torch.sigmoid(logits.squeeze(-1))
        return {"prediction": (p > 0.5).long(), "probabilities": torch.stack([1 - p, p], dim=-1)}

    def metric_input(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(logits.squeeze(-1)), target.long()

    def true_class_probability(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits.reshape(-1))
        return torch.where(target.reshape(-1) > 0.5, p, 1 - p)

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics

        return torchmetrics.MetricCollection(
            {
                "accuracy": torchmetrics.Accuracy(task="binary"),
                "f1": torchmetrics.F1Score(task="binary"),
                "auroc": torchmetrics.AUROC(task="binary"),
            }
        )

    def describe(self, pred: dict[str, torch.Tensor], i: int) -> dict[str, Any]:
        probs = dict(zip(self.classes, pred["probabilities"][i].tolist()))
        return {"label": self.classes[int(pred["prediction"][i])], "probabilities": probs}

    def format(self, described: dict[str, Any], top: int = 3) -> str:
        return format_top(described["label"], described["probabilities"], top)
