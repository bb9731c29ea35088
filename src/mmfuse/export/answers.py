"""Each task's answer from an exported model's raw outputs, in numpy: the same JSON as the task kinds' `predict` and
`describe` give in the PyTorch engine (`mmfuse.tasks`), and the same terminal line as their `format`.

Shapes: B batch, C classes (or outputs).

multiclass: softmax, the class of highest probability (ties: the first); binary: sigmoid of the one logit, the
positive class above 0.5, probabilities [1 - p, p]; multilabel: sigmoid per label, the labels above 0.5;
regression: the value. An output that is not finite is refused, as in the PyTorch engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmfuse.text import format_top

KINDS = ("multiclass", "binary", "multilabel", "regression")  # the task kinds answered here


def softmax(z: np.ndarray) -> np.ndarray:
    """(B, C) logits -> (B, C) probabilities, in the logits' dtype."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Elementwise 1 / (1 + exp(-z)), without overflow for large |z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype)


class Answers:
    """The tasks of an export (export.json's `outputs`): raw outputs -> per record {task: description}.

    Args:
        outputs: export.json's `outputs`: each task's `name`, `kind` and `classes`, in the graph's output order.
    """

    def __init__(self, outputs: Sequence[Mapping[str, Any]]) -> None:
        self.outputs = list(outputs)
        self.names = [o["name"] for o in self.outputs]
        self.kinds = {o["name"]: o["kind"] for o in self.outputs}

    def describe(self, logits: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """One (B, C_t) array per task -> B dicts {task: description}.

        Raises:
            DataError: a task's output is not finite for some record (one line, as the PyTorch engine's).
        """
        per_task = {}
        for out, z in zip(self.outputs, logits, strict=True):
            _check_finite(out["name"], z)
            per_task[out["name"]] = _describe(out["kind"], out["classes"], np.asarray(z))
        count = len(logits[0]) if logits else 0
        return [{name: rows[i] for name, rows in per_task.items()} for i in range(count)]

    def format(self, name: str, described: Mapping[str, Any], top: int = 3) -> str:
        """One short line for the terminal."""
        kind = self.kinds[name]
        if kind == "regression":
            return f"{described['value']:.4f}"
        return format_top(described["labels" if kind == "multilabel" else "label"], described["probabilities"], top)


def _describe(kind: str, classes: list[str] | None, z: np.ndarray) -> list[dict[str, Any]]:
    if kind == "multiclass":
        p = softmax(z)
        return [{"label": classes[int(row.argmax())], "probabilities": dict(zip(classes, row.tolist()))} for row in p]
    if kind == "binary":
        p = sigmoid(z[:, 0])
        probs = np.stack([1 - p, p], axis=-1)
        return [
            {"label": classes[int(pi > 0.5)], "probabilities": dict(zip(classes, row.tolist()))}
            for pi, row in zip(p, probs)
        ]
    if kind == "multilabel":
        p = sigmoid(z)
        return [
            {
                "labels": [c for c, on in zip(classes, row > 0.5) if on],
                "probabilities": dict(zip(classes, row.tolist())),
            }
            for row in p
        ]
    if kind == "regression":
        return [{"value": float(v)} for v in z[:, 0]]
    raise ValueError(f"task kind {kind!r} has no ONNX answer (known: multiclass, binary, multilabel, regression)")


def _check_finite(name: str, z: np.ndarray) -> None:
    finite = np.isfinite(z).reshape(len(z), -1).all(axis=1)  # (B,)
    if finite.all():
        return
    from mmfuse.data.records import DataError

    rows = np.flatnonzero(~finite).tolist()
    err = DataError(
        f"the model's output for task {name!r} is not finite (NaN or infinite) for {len(rows)} of "
        f"{len(z)} record(s), most often an input far outside the training data; no answer is given"
    )
    err.rows = rows  # type: ignore[attr-defined]
    raise err
