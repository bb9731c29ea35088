"""Batching: each encoder collates its modality (placeholders where missing), each task its labels.

Shapes: B batch.

A batch is `{"index": (B,) long, "inputs": {modality: collated}, "absent": {modality: (B,) bool},
"labels": {task: tensor}, "masks": {task: (B,) bool}}`. `absent` only names modalities that at
least one sample lacks; such a sample gets its encoder's `placeholder()`, which the model replaces by
exact zeros through `absent`. A missing label gets its task's filler and is masked out (mask False).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmfuse.encoders.base import Encoder
from mmfuse.tasks import Task


class Collator:
    """collate_fn for a DataLoader over `MultiModalDataset`; plain attributes only, so it pickles.

    Args:
        encoders: {modality: encoder} whose inputs the samples carry (`collate`, `placeholder`).
        tasks: {task name: Task}; each collates its own labels (dtype, shape, filler).
    """

    def __init__(self, encoders: Mapping[str, Encoder], tasks: Mapping[str, Task]) -> None:
        self.encoders = dict(encoders)
        self.tasks = dict(tasks)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        inputs, absent = {}, {}
        for modality, encoder in self.encoders.items():
            items = [s["inputs"][modality] for s in samples]
            missing = [item is None for item in items]
            if any(missing):
                absent[modality] = torch.tensor(missing, dtype=torch.bool)
                fill = encoder.placeholder()
                items = [fill if item is None else item for item in items]
            inputs[modality] = encoder.collate(items)
        labels, masks = {}, {}
        for name, task in self.tasks.items():
            labels[name], masks[name] = task.collate([s["labels"].get(name) for s in samples])
        return {
            "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long),
            "inputs": inputs,
            "absent": absent,
            "labels": labels,
            "masks": masks,
        }
