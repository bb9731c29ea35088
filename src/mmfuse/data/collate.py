"""Batching: processor collation (dynamic padding), absent-modality flags, labels and label masks.

Shapes: B batch, C classes of a multilabel task.

A batch is `{"index": (B,) long, "inputs": {modality: collated}, "absent": {modality: (B,) bool},
"labels": {task: tensor}, "masks": {task: (B,) bool}}`. `absent` only names modalities that at
least one sample lacks; such a sample gets a placeholder input (zeros for an image, the empty
string for a text) that the model replaces by exact zeros through `absent`. A missing label
is stored as 0 and masked out (mask False).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from mmfuse.data.dataset import preprocess
from mmfuse.tasks import Task


class Collator:
    """collate_fn for a DataLoader over `MultiModalDataset`; plain attributes only, so it pickles.

    Args:
        processors: {modality: obj with `collate(items)`} (and `preprocess` for placeholders).
        tasks: {task name: Task}; decides each label tensor's dtype and shape.
    """

    def __init__(self, processors: Mapping[str, Any], tasks: Mapping[str, Task]) -> None:
        self.processors = dict(processors)
        self.tasks = dict(tasks)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        inputs, absent = {}, {}
        for modality, processor in self.processors.items():
            items = [s["inputs"][modality] for s in samples]
            missing = [item is None for item in items]
            if any(missing):
                absent[modality] = torch.tensor(missing, dtype=torch.bool)
                items = self._fill(modality, items)
            inputs[modality] = processor.collate(items)
        labels, masks = {}, {}
        for name, task in self.tasks.items():
            labels[name], masks[name] = _label_tensor(task, [s["labels"].get(name) for s in samples])
        return {
            "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long),
            "inputs": inputs,
            "absent": absent,
            "labels": labels,
            "masks": masks,
        }

    def _fill(self, modality: str, items: list[Any]) -> list[Any]:
        """Replace None items by a placeholder: zeros shaped like a present image, or an empty text."""
        present = next((item for item in items if item is not None), None)
        if modality == "image" and isinstance(present, torch.Tensor):
            placeholder = torch.zeros_like(present)
        else:
            raw = "" if modality == "text" else Image.new("RGB", (32, 32))
            placeholder = preprocess(self.processors[modality], raw, train=False)
            if isinstance(placeholder, torch.Tensor):
                placeholder = torch.zeros_like(placeholder)
        return [placeholder if item is None else item for item in items]


def _label_tensor(task: Task, values: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, mask): multiclass (B,) long, multilabel (B, C) float, others (B,) float; missing -> 0."""
    mask = torch.tensor([v is not None for v in values], dtype=torch.bool)
    if task.kind == "multilabel":
        filler: Any = [0.0] * task.out_dim
        dtype = torch.float32
    else:
        filler = 0
        dtype = torch.long if task.kind == "multiclass" else torch.float32
    return torch.tensor([filler if v is None else v for v in values], dtype=dtype), mask
