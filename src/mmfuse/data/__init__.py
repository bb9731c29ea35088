"""Data: records (JSONL/CSV/easy-VQA) read through each modality's encoder, up-front validation, the dataset
and the batch collator. Nothing here branches on a modality's or a task kind's name."""

from mmfuse.data.collate import Collator
from mmfuse.data.dataset import MultiModalDataset, check_inputs, encode_labels, validate_records
from mmfuse.data.records import (
    DataError,
    Record,
    Schema,
    default_group_by,
    load_record_splits,
    read_records,
    shared_inputs,
    split_records,
)

__all__ = [
    "Collator",
    "DataError",
    "MultiModalDataset",
    "Record",
    "Schema",
    "check_inputs",
    "default_group_by",
    "encode_labels",
    "load_record_splits",
    "read_records",
    "shared_inputs",
    "split_records",
    "validate_records",
]
