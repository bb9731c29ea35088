"""Data: records (JSONL/CSV/easy-VQA) read through each modality's encoder, up-front validation, the dataset
and the batch collator. Nothing here branches on a modality's or a task kind's name.

The names below are imported on first use, so `mmfuse.data.records` (standard library only) can be imported
without torch, which the collator and the dataset import (the ONNX predict engine never imports torch); the same
pattern as `mmfuse/__init__.py`.
"""

from __future__ import annotations

from mmfuse.lazy import lazy_getattr

_LAZY = {
    "Collator": "mmfuse.data.collate",
    "MultiModalDataset": "mmfuse.data.dataset",
    "check_inputs": "mmfuse.data.dataset",
    "encode_labels": "mmfuse.data.dataset",
    "validate_records": "mmfuse.data.dataset",
    "DataError": "mmfuse.data.records",
    "Record": "mmfuse.data.records",
    "Schema": "mmfuse.data.records",
    "default_group_by": "mmfuse.data.records",
    "load_record_splits": "mmfuse.data.records",
    "read_records": "mmfuse.data.records",
    "shared_inputs": "mmfuse.data.records",
    "split_records": "mmfuse.data.records",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
