"""The `export.json` that travels with an exported model: what to feed it and what it answers.

Preprocessing is described from the built encoders (their processor, tokenizer or fitted statistics), so the file
says exactly what `mmfuse predict` does to a record before the network sees it.
"""

from __future__ import annotations

from typing import Any

from mmfuse.encoders.base import Encoder
from mmfuse.model import MultiTaskModel


def preprocessing(encoder: Encoder) -> dict[str, Any]:
    """What turns one raw input into the encoder's collated tensors, as plain JSON values."""
    from mmfuse.encoders.embedding import EmbeddingEncoder
    from mmfuse.encoders.image_common import ImagePreprocessor
    from mmfuse.encoders.tabular import MISSING, UNKNOWN, Z_MAX, TabularEncoder

    base: dict[str, Any] = {"encoder": type(encoder).__name__, "kind": encoder.modality}
    processor = getattr(encoder, "processor", None)
    tokenizer = getattr(encoder, "tokenizer", None)
    if isinstance(processor, ImagePreprocessor):
        return base | {
            "image_size": processor.image_size,
            "steps": "RGB; resize the shorter side to image_size, centre-crop image_size x image_size; "
            "float32 in [0, 1]; (x - mean) / std per channel; layout (3, H, W)",
            "interpolation": processor.interpolation.value,
            "mean": list(processor.mean),
            "std": list(processor.std),
        }
    if tokenizer is not None:
        return base | {
            "tokenizer": str(tokenizer.name_or_path),
            "max_length": int(getattr(encoder, "max_length", tokenizer.model_max_length)),
            "steps": "strip the text; tokenizer(texts, padding='longest', truncation=True, max_length=max_length)",
        }
    if isinstance(encoder, TabularEncoder):
        return base | {
            "numeric": encoder.numeric_columns,
            "categorical": encoder.categorical_columns,
            **encoder.options(),
            "steps": f"numeric: z = (x - mean) / std clamped to +-{Z_MAX:g}, 0 where missing (numeric_present False); "
            f"categorical: {MISSING} missing, {UNKNOWN} unknown, 2 + index in categories[column]",
        }
    if isinstance(encoder, EmbeddingEncoder):
        return base | {"dim": encoder.dim, "steps": "the vector as float32"}
    return base | {"steps": f"see {type(encoder).__name__}.preprocess and .collate"}


def outputs(model: MultiTaskModel) -> list[dict[str, Any]]:
    """One entry per task: the output's name, the task's kind, its classes (None for a regression) and shape.

    Each output is the task head's raw output, as `mmfuse predict` reads it: logits (sigmoid for binary and
    multilabel, softmax for multiclass) or a regression's value.
    """
    return [
        {
            "name": name,
            "task": name,
            "kind": task.kind,
            "classes": task.classes,
            "shape": ["batch", task.out_dim],
        }
        for name, task in model.tasks.items()
    ]
