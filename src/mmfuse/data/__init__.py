"""Data: records (JSONL/CSV/easy-VQA), up-front validation, the dataset and the batch collator."""

from mmfuse.data.collate import Collator
from mmfuse.data.dataset import MultiModalDataset, check_image, encode_labels, validate_records
from mmfuse.data.easy_vqa import EASY_VQA_TASKS, image_labels, label_coverage, load_easy_vqa, question_type
from mmfuse.data.records import (
    DataError,
    Record,
    infer_classes,
    load_record_splits,
    read_records,
    split_records,
)

__all__ = [
    "EASY_VQA_TASKS",
    "Collator",
    "DataError",
    "MultiModalDataset",
    "Record",
    "check_image",
    "encode_labels",
    "image_labels",
    "infer_classes",
    "label_coverage",
    "load_easy_vqa",
    "load_record_splits",
    "question_type",
    "read_records",
    "split_records",
    "validate_records",
]
