"""Predictions from a finished run directory: per task, the class (or value) and the probabilities."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mmfuse.data.collate import Collator
from mmfuse.data.dataset import MultiModalDataset, validate_records
from mmfuse.data.records import Record
from mmfuse.model import MultiTaskModel
from mmfuse.train.run import load_run
from mmfuse.utils import move_to


class Predictor:
    """Loads a run once; predicts for records with an image, a text, or both.

    Example:
        >>> p = Predictor("runs/easy_vqa")
        >>> p.predict([Record(image="shape.png", text="what color is the shape?", labels={}, source="cli")])
        [{"answer": {"label": "blue", "probabilities": {...}}, ...}]
    """

    def __init__(self, run_dir: str | Path, device: str | None = None) -> None:
        self.model: MultiTaskModel = load_run(run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)

    def batches(self, records: Sequence[Record], batch_size: int) -> Iterator[dict[str, Any]]:
        modalities = [m for m in self.model.encoders if any(getattr(r, m) is not None for r in records)]
        validate_records(records, {}, modalities, allow_missing=True)
        dataset = MultiModalDataset(records, {}, dict(self.model.encoders), train=False)
        yield from DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(dict(self.model.encoders), {}))

    @torch.inference_mode()
    def predict(self, records: Sequence[Record], batch_size: int = 64) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for batch in self.batches(records, batch_size):
            inputs = move_to(batch["inputs"], self.device)
            absent = {m: a.to(self.device) for m, a in batch.get("absent", {}).items()}
            out = self.model(inputs, absent=absent or None)
            per_task = {name: task.predict(out.logits[name]) for name, task in self.model.tasks.items()}
            for i in range(len(batch["index"])):
                results.append({name: self._describe(name, p, i) for name, p in per_task.items()})
        return results

    def _describe(self, name: str, pred: dict[str, torch.Tensor], i: int) -> dict[str, Any]:
        task = self.model.tasks[name]
        if task.kind == "regression":
            return {"value": float(pred["prediction"][i])}
        probs = pred["probabilities"][i].tolist()
        classes = task.classes
        if task.kind == "multilabel":
            labels = [c for c, on in zip(classes, pred["prediction"][i].tolist()) if on]
            return {"labels": labels, "probabilities": dict(zip(classes, probs))}
        return {"label": classes[int(pred["prediction"][i])], "probabilities": dict(zip(classes, probs))}
