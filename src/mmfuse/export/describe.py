"""The `export.json` that travels with an exported model: what to feed it and what it answers.

Preprocessing is described from the built encoders (their processor, tokenizer or fitted statistics), so the file
says exactly what `mmfuse predict` does to a record before the network sees it. `reading` says which record fields
each input comes from and how they are read, and `weights` names the run's weights file: with them the torch-free
ONNX engine of `mmfuse predict` (`mmfuse.export.runtime`) reads records as the encoders do, and knows when the
export is older than the run's weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmfuse.encoders.base import Encoder
from mmfuse.model import MultiTaskModel

# How a known encoder family reads a record's field(s); an encoder of another family gets none, and the ONNX engine
# refuses to read its input (naming the modality and the encoder).
READS = {"ImageEncoder": "image_file", "HFTextEncoder": "text", "TabularEncoder": "table", "EmbeddingEncoder": "vector"}


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
        return base | {
            "dim": encoder.dim,
            "columns": encoder.columns,
            "prefix": encoder.prefix,
            "steps": "the vector as float32",
        }
    return base | {"steps": f"see {type(encoder).__name__}.preprocess and .collate"}


def reading(config: Any, model: MultiTaskModel) -> dict[str, Any]:
    """How records become inputs: per modality the configured `field`, the row keys its encoder reads and how it
    reads them (`reads`: image_file, text, table, vector, or None for an encoder the ONNX engine cannot read);
    the other fields a record may carry (labels, split, group); whether training hid whole modalities."""
    from mmfuse.builders import build_schema, trained_for_missing_inputs

    schema = build_schema(config, model.encoders)
    families = {m: [c.__name__ for c in type(e).__mro__] for m, e in model.encoders.items()}
    return {
        "inputs": {
            m: {
                "field": schema.field_of(m),
                "row_keys": schema.row_keys(m),
                "reads": next((READS[name] for name in families[m] if name in READS), None),
            }
            for m in model.encoders
        },
        "other_fields": sorted({*schema.labels.values(), schema.split_field, schema.group_by} - {None}),
        "trained_for_missing": trained_for_missing_inputs(config),
    }


def write_tokenizers(model: MultiTaskModel, out: Path) -> dict[str, dict[str, Any]]:
    """Write each text encoder's fast tokenizer, as its encoder calls it, to `out/<modality>.tokenizer.json`;
    {modality: its file and the padding and truncation the encoder asks for}. A slow tokenizer gets none."""
    written = {}
    for m, encoder in model.encoders.items():
        tokenizer = getattr(encoder, "tokenizer", None)
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is None or tokenizer.pad_token_id is None:
            continue
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(backend.to_str())  # a copy: the encoder's own tokenizer keeps its state
        plain.no_padding()
        plain.no_truncation()
        name = f"{m}.tokenizer.json"
        plain.save(os.fspath(out / name))
        written[m] = {
            "tokenizer_file": name,
            "padding": {
                "pad_id": int(tokenizer.pad_token_id),
                "pad_type_id": int(tokenizer.pad_token_type_id),
                "pad_token": str(tokenizer.pad_token),
                "direction": str(tokenizer.padding_side),
            },
            "truncation": {"strategy": "longest_first", "direction": str(tokenizer.truncation_side)},
        }
    return written


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
