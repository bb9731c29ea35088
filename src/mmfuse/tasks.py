"""Task kinds: each knows its head size, label vocabulary, loss, predictions and metrics.

Shapes: B batch, C classes (or outputs).
A label mask `(B,)` bool marks the samples that carry a label for the task; the loss and the
metrics only ever see those rows, so a masked label of any value (even NaN) changes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from mmfuse.registry import Registry

TASK_KINDS: Registry[type[Task]] = Registry("task kind")


class LabelError(ValueError):
    """A raw label that a task cannot accept; the data layer adds the file and row."""


class Task:
    """One prediction target. Subclasses implement the kind-specific parts."""

    kind: str = ""
    default_metric: str = ""

    def __init__(self, name: str, classes: list[str] | None = None, weight: float = 1.0) -> None:
        self.name = name
        self.classes = list(classes) if classes is not None else None
        self.weight = weight

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    def encode(self, raw: Any) -> Any:
        """Turn one raw label (from a record) into the value stored in the batch."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"prediction": (B,) or (B, C), "probabilities": (B, C) or absent}."""
        raise NotImplementedError

    def metrics(self) -> torchmetrics.MetricCollection:
        raise NotImplementedError

    def metric_input(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits, target

    def masked_loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean loss over labelled rows; a zero that keeps the graph when no row is labelled."""
        if not bool(mask.any()):
            return logits.sum() * 0.0
        return self.loss(logits[mask], target[mask])

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": self.classes, "weight": self.weight}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, classes={self.classes})"


def _require_classes(task: Task, minimum: int) -> list[str]:
    if not task.classes or len(task.classes) < minimum:
        raise ValueError(f"task {task.name!r} ({task.kind}) needs at least {minimum} classes")
    if len(set(task.classes)) != len(task.classes):
        raise ValueError(f"task {task.name!r} has duplicate classes")
    return task.classes


@TASK_KINDS.register("binary")
class BinaryTask(Task):
    """Two classes, one logit, BCE-with-logits; labels 0/1, true/false or the two class names."""

    kind = "binary"
    default_metric = "auroc"
    _truthy = {"1", "true", "yes", "1.0"}
    _falsy = {"0", "false", "no", "0.0"}

    def __init__(self, name: str, classes: list[str] | None = None, weight: float = 1.0) -> None:
        super().__init__(name, classes or ["0", "1"], weight)
        if len(self.classes) != 2:
            raise ValueError(f"task {name!r} (binary) needs exactly 2 classes, got {self.classes}")

    @property
    def out_dim(self) -> int:
        return 1

    def encode(self, raw: Any) -> float:
        text = str(raw).strip()
        if text in self.classes:
            return float(self.classes.index(text))
        if isinstance(raw, bool) or text.lower() in self._truthy | self._falsy:
            return 1.0 if text.lower() in self._truthy else 0.0
        raise LabelError(f"label {raw!r} is not one of {self.classes} or 0/1/true/false")

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), target.float())

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        p = torch.sigmoid(logits.squeeze(-1))
        return {"prediction": (p > 0.5).long(), "probabilities": torch.stack([1 - p, p], dim=-1)}

    def metric_input(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(logits.squeeze(-1)), target.long()

    def metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection(
            {
                "accuracy": torchmetrics.Accuracy(task="binary"),
                "f1": torchmetrics.F1Score(task="binary"),
                "auroc": torchmetrics.AUROC(task="binary"),
            }
        )


@TASK_KINDS.register("multiclass")
class MulticlassTask(Task):
    """One of C named classes, cross-entropy."""

    kind = "multiclass"
    default_metric = "accuracy"

    def __init__(self, name: str, classes: list[str] | None = None, weight: float = 1.0) -> None:
        super().__init__(name, classes, weight)
        _require_classes(self, 2)
        self._index = {c: i for i, c in enumerate(self.classes)}

    @property
    def out_dim(self) -> int:
        return len(self.classes)

    def encode(self, raw: Any) -> int:
        key = str(raw).strip()
        if key not in self._index:
            shown = ", ".join(self.classes[:20]) + (" ..." if len(self.classes) > 20 else "")
            raise LabelError(f"label {raw!r} is not one of the classes of task {self.name!r}: {shown}")
        return self._index[key]

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target.long())

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        p = logits.softmax(-1)
        return {"prediction": p.argmax(-1), "probabilities": p}

    def metrics(self) -> torchmetrics.MetricCollection:
        c = len(self.classes)
        return torchmetrics.MetricCollection(
            {
                "accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=c, average="micro"),
                "macro_f1": torchmetrics.F1Score(task="multiclass", num_classes=c, average="macro"),
            }
        )


@TASK_KINDS.register("multilabel")
class MultilabelTask(Task):
    """Any subset of C named labels, one BCE logit each; a raw label is a list or a "a|b" string."""

    kind = "multilabel"
    default_metric = "macro_f1"

    def __init__(self, name: str, classes: list[str] | None = None, weight: float = 1.0) -> None:
        super().__init__(name, classes, weight)
        _require_classes(self, 1)
        self._index = {c: i for i, c in enumerate(self.classes)}

    @property
    def out_dim(self) -> int:
        return len(self.classes)

    def encode(self, raw: Any) -> list[float]:
        names = [s.strip() for s in raw.split("|")] if isinstance(raw, str) else list(raw)
        vec = [0.0] * len(self.classes)
        for n in names:
            if str(n) not in self._index:
                raise LabelError(f"label {n!r} is not one of the classes of task {self.name!r}: {self.classes}")
            vec[self._index[str(n)]] = 1.0
        return vec

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target.float())

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        p = torch.sigmoid(logits)
        return {"prediction": (p > 0.5).long(), "probabilities": p}

    def metric_input(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(logits), target.long()

    def metrics(self) -> torchmetrics.MetricCollection:
        c = len(self.classes)
        return torchmetrics.MetricCollection(
            {
                "accuracy": torchmetrics.Accuracy(task="multilabel", num_labels=c),
                "macro_f1": torchmetrics.F1Score(task="multilabel", num_labels=c, average="macro"),
            }
        )


@TASK_KINDS.register("regression")
class RegressionTask(Task):
    """One real-valued target; MSE (default) or L1 loss."""

    kind = "regression"
    default_metric = "mae"

    def __init__(self, name: str, classes: list[str] | None = None, weight: float = 1.0, loss: str = "mse") -> None:
        if classes:
            raise ValueError(f"task {name!r} (regression) takes no classes")
        super().__init__(name, None, weight)
        if loss not in ("mse", "l1"):
            raise ValueError(f"task {name!r}: loss must be 'mse' or 'l1', got {loss!r}")
        self.loss_name = loss

    @property
    def out_dim(self) -> int:
        return 1

    def encode(self, raw: Any) -> float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise LabelError(f"regression target {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise LabelError(f"regression target {raw!r} is not finite")
        return value

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fn = F.mse_loss if self.loss_name == "mse" else F.l1_loss
        return fn(logits.squeeze(-1), target.float())

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"prediction": logits.squeeze(-1)}

    def metric_input(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.squeeze(-1), target.float()

    def metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection(
            {"mae": torchmetrics.MeanAbsoluteError(), "rmse": torchmetrics.MeanSquaredError(squared=False)}
        )

    def state(self) -> dict[str, Any]:
        return {**super().state(), "loss": self.loss_name}


def build_task(name: str, kind: str, **options: Any) -> Task:
    """Build a task by kind name, e.g. `build_task("answer", "multiclass", classes=[...])`."""
    return TASK_KINDS.get(kind)(name, **options)


HEADS: Registry[type[nn.Module]] = Registry("head")


@HEADS.register("mlp")
class MLPHead(nn.Module):
    """A Linear head, or an MLP when `hidden_dims` is non-empty: (B, D_in) -> (B, C)."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dims: list[int] | None = None, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        d = input_dim
        for h in hidden_dims or []:
            layers += [nn.Linear(d, h), nn.GELU(), nn.Dropout(dropout)]
            d = h
        if not layers and dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(d, output_dim))
        self.net = nn.Sequential(*layers)
        self.input_dim, self.output_dim = input_dim, output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
