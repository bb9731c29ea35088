"""Batching: each encoder collates its modality (placeholders where missing), each task its labels.

Shapes: B batch.

A batch is `{"index": (B,) long, "inputs": {modality: collated}, "absent": {modality: (B,) bool},
"labels": {task: tensor}, "masks": {task: (B,) bool}}`. `absent` only names modalities that at
least one sample lacks; such a sample gets its encoder's `placeholder()`, which the model replaces by
exact zeros through `absent`. A missing label gets its task's filler and is masked out (mask False).
A deduplicated modality's input is `UniqueInputs`: its U distinct inputs collated once and the (B,) row
of each record, so the model runs the encoder on U rows and scatters the features back.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

import torch

from mmfuse.encoders.base import Encoder, UniqueInputs
from mmfuse.tasks import Task


class Collator:
    """collate_fn for a DataLoader over `MultiModalDataset`; plain attributes only, so it pickles.

    Args:
        encoders: {modality: encoder} whose inputs the samples carry (`collate`, `placeholder`).
        tasks: {task name: Task}; each collates its own labels (dtype, shape, filler).
        dedupe: modalities whose distinct inputs are collated once per batch (by the samples' `refs`): the
            batch then carries `UniqueInputs` (U <= B items + each record's row) and the model encodes U rows.
            Only for deterministic preprocessing (records sharing a reference must share the item).
    """

    def __init__(
        self, encoders: Mapping[str, Encoder], tasks: Mapping[str, Task], dedupe: Collection[str] = ()
    ) -> None:
        self.encoders = dict(encoders)
        self.tasks = dict(tasks)
        self.dedupe = set(dedupe)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        inputs, absent = {}, {}
        for modality, encoder in self.encoders.items():
            items = [s["inputs"][modality] for s in samples]
            missing = [item is None for item in items]
            if any(missing):
                absent[modality] = torch.tensor(missing, dtype=torch.bool)
                fill = encoder.placeholder()
                items = [fill if item is None else item for item in items]
            if modality in self.dedupe:
                inputs[modality] = collate_unique(encoder, items, [s["refs"][modality] for s in samples])
            else:
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


def collate_unique(encoder: Encoder, items: list[Any], refs: Sequence[Hashable | None]) -> Any:
    """Collate the first item of each distinct reference once (missing inputs, None, share one placeholder).

    Returns:
        `UniqueInputs(encoder.collate(U items), index (B,))`, or the plain collated batch when no two records
        share a reference (U == B: nothing to save).
    """
    slot: dict[Hashable | None, int] = {}
    index = [slot.setdefault(ref, len(slot)) for ref in refs]
    if len(slot) == len(refs):
        return encoder.collate(items)
    first: dict[int, int] = {}
    for b, u in enumerate(index):
        first.setdefault(u, b)
    unique = [items[first[u]] for u in range(len(slot))]
    return UniqueInputs(encoder.collate(unique), torch.tensor(index, dtype=torch.long))


def merge_absent(*masks: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """{modality: (B,) bool} masks of samples lacking a modality, merged: a sample lacks it when any mask says so.

    A modality named by one mask only keeps that mask (the same tensor); None counts as no mask.
    """
    merged: dict[str, torch.Tensor] = {}
    for mask in masks:
        for m, a in (mask or {}).items():
            merged[m] = merged[m] | a if m in merged else a
    return merged
