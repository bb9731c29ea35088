"""The multi-task, multi-modal model: encoders -> fusion -> one head per task.

Shapes: B batch, D_out fused size, C_t outputs of task t.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmfuse.encoders.base import Encoder, EncoderOutput, UniqueInputs
from mmfuse.fusion.base import Fusion, FusionOutput
from mmfuse.tasks import MLPHead, Task


@dataclass
class ModelOutput:
    """logits: {task: (B, C_t)}; fusion: the fusion's output; features: {modality: EncoderOutput}."""

    logits: dict[str, torch.Tensor]
    fusion: FusionOutput
    features: dict[str, EncoderOutput] = field(default_factory=dict)


class MultiTaskModel(nn.Module):
    """Shared trunk (encoders + fusion) and one head per task in an `nn.ModuleDict`.

    Args:
        encoders: {modality: built encoder}; the fusion's `input_dims` must match their `output_dim`.
        fusion: a built fusion.
        tasks: {task name: Task}; a head per task is built on `fusion.output_dim` unless given.
        heads: optional {task name: module} mapping (B, D_out) to (B, task.out_dim).

    Example:
        >>> model = MultiTaskModel({"image": img_enc, "text": txt_enc}, fusion, {"answer": task})
        >>> out = model({"image": pixels, "text": {"input_ids": ids, "attention_mask": mask}})
        >>> out.logits["answer"].shape  # (B, C)
    """

    def __init__(
        self,
        encoders: Mapping[str, Encoder],
        fusion: Fusion,
        tasks: Mapping[str, Task],
        heads: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        dims = {m: e.output_dim for m, e in encoders.items()}
        if dims != fusion.input_dims:
            raise ValueError(f"fusion expects input sizes {fusion.input_dims} but the encoders give {dims}")
        if not tasks:
            raise ValueError("a model needs at least one task")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion = fusion
        self.tasks = dict(tasks)
        heads = dict(heads or {})
        for name, task in self.tasks.items():
            heads.setdefault(name, MLPHead(fusion.output_dim, task.out_dim))
        self.heads = nn.ModuleDict(heads)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def encode(
        self,
        inputs: Mapping[str, Any],
        features: Mapping[str, EncoderOutput] | None = None,
        absent: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, EncoderOutput]:
        """Run each encoder on its input, unless its features are given (e.g. from a cache).

        Args:
            inputs: {modality: encoder input}, as made by the encoder's `collate`, or `UniqueInputs` (each
                distinct input of the batch once, plus each record's row): encoded once, features scattered back.
            features: {modality: EncoderOutput} to use instead of running the encoder.
            absent: {modality: (B,) bool}, True where a sample lacks that modality (missing at
                prediction time, or dropped in training): its features become exact zeros.
        """
        out: dict[str, EncoderOutput] = {}
        for modality, encoder in self.encoders.items():
            if features is not None and modality in features:
                feats = features[modality]
            elif isinstance(inputs.get(modality), UniqueInputs):
                shared = inputs[modality]  # each distinct input once: (U, ...) features, then a row per record
                feats = encoder(shared.unique)
                feats = feats.select(shared.index.to(feats.pooled.device))
            elif modality in inputs:
                feats = encoder(inputs[modality])
            else:
                raise KeyError(f"no input and no features for modality {modality!r}")
            if absent is not None and modality in absent and bool(absent[modality].any()):
                feats = feats.without(absent[modality].to(feats.pooled.device))
            out[modality] = feats
        return out

    def forward(
        self,
        inputs: Mapping[str, Any],
        features: Mapping[str, EncoderOutput] | None = None,
        absent: Mapping[str, torch.Tensor] | None = None,
    ) -> ModelOutput:
        feats = self.encode(inputs, features, absent)
        fused = self.fusion(feats)
        logits = {name: head(fused.fused) for name, head in self.heads.items()}
        return ModelOutput(logits=logits, fusion=fused, features=feats)

    def losses(
        self, logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per-task mean loss over the labelled rows of each task (unweighted)."""
        return {t: self.tasks[t].masked_loss(logits[t], labels[t], masks[t]) for t in self.tasks}

    def trainable_parameters(self, group: str) -> list[nn.Parameter]:
        """Parameters of the "encoders" or of the "head" (fusion + heads) that require grad."""
        mods = [self.encoders] if group == "encoders" else [self.fusion, self.heads]
        return [p for m in mods for p in m.parameters() if p.requires_grad]
