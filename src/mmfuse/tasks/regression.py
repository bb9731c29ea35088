"""Regression task: one real-valued target, MSE or L1."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmfuse.tasks.base import TASK_KINDS, LabelError, Task

if TYPE_CHECKING:  # torchmetrics is imported by `metrics()` alone: predicting never needs it
    import torchmetrics

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}


@TASK_KINDS.register("regression")
class RegressionTask(Task):
    """One real-valued target; MSE (default) or L1 loss. Targets are numbers or numeric strings.

    Args:
        name: the task's name.
        classes: must be None (a regression has no classes).
        weight: the task's loss weight.
        loss: "mse" or "l1".
    """

    kind = "regression"
    default_metric = "mae"
    example_labels = ("2.5", -1, 0.5)

    def __init__(self, name: str, classes: list[str] | None = None, weight: float = 1.0, loss: str = "mse") -> None:
        if classes:
            raise ValueError(f"task {name!r} (regression) takes no classes")
        super().__init__(name, None, weight)
        if loss not in LOSSES:
            raise ValueError(f"task {name!r}: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss_name = loss

    @property
    def out_dim(self) -> int:
        return 1

    def encode(self, raw: Any) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            shown = repr(raw) if isinstance(raw, bool) else type(raw).__name__
            raise LabelError(f"regression target {shown[:40]} is not a number")
        if isinstance(raw, str) and len(raw) > 100:
            raise LabelError(f"regression target {raw[:30]!r}... is not a number ({len(raw)} characters)")
        if isinstance(raw, int) and abs(raw) > FLOAT32_MAX:  # checked before str() or float() of a huge int
            raise LabelError(f"regression target of {raw.bit_length()} bits is too large for float32")
        try:
            value = float(raw)
        except OverflowError:
            raise LabelError(f"regression target {str(raw)[:30]}... is too large for a float") from None
        except ValueError:
            raise LabelError(f"regression target {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise LabelError(f"regression target {raw!r} is not finite")
        if abs(value) > FLOAT32_MAX:
            raise LabelError(f"regression target {value:g} overflows float32 (|x| <= {FLOAT32_MAX:.3g})")
        return value

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LOSSES[self.loss_name](logits.squeeze(-1), target.float())

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_finite(logits)
        return {"prediction": logits.squeeze(-1)}

    def metric_input(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.squeeze(-1), target.float()

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics

        return torchmetrics.MetricCollection(
            {"mae": torchmetrics.MeanAbsoluteError(), "rmse": torchmetrics.MeanSquaredError(squared=False)}
        )

    def describe(self, pred: dict[str, torch.Tensor], i: int) -> dict[str, Any]:
        return {"value": float(pred["prediction"][i])}

    def format(self, described: dict[str, Any], top: int = 3) -> str:
        return f"{described['value']:.4f}"

    def state(self) -> dict[str, Any]:
        return {**super().state(), "loss": self.loss_name}
