"""What an exported model takes and gives: flat named tensors in, one logits tensor per task out.

Shapes: B batch, T tokens of a modality whose inputs have a length (padded to the longest in the batch), C_t outputs
of task t.

A modality's collated input (`encoder.collate`) is a tensor, named after the modality (`image`), or a mapping of
tensors, each named `<modality>.<key>` (`text.input_ids`). Axis 0 of every input is the batch; axis 1 is the
modality's sequence axis when its encoder has a notion of length (`encoder.length(ref)` is not None: padded inputs).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmfuse.model import MultiTaskModel

BATCH = "batch"


@dataclass(frozen=True)
class InputSpec:
    """One flat input: its name, the modality it belongs to, its key in the collated mapping (None: the collated
    input is this tensor), its dtype and its shape with the dynamic axes named."""

    name: str
    modality: str
    key: str | None
    dtype: str
    shape: tuple[int | str, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "modality": self.modality, "dtype": self.dtype, "shape": list(self.shape)}


def input_specs(model: MultiTaskModel, inputs: Mapping[str, Any], refs: Mapping[str, Hashable]) -> list[InputSpec]:
    """The flat inputs of a collated batch `inputs` ({modality: tensor or {key: tensor}}), in model order.

    Args:
        model: the run's model (its encoders decide the modalities and which of them have a sequence axis).
        inputs: one collated batch of the run's records.
        refs: {modality: one record's reference}, to ask each encoder whether its inputs have a length.
    """
    specs = []
    for modality, encoder in model.encoders.items():
        value = inputs[modality]
        sequence = encoder.length(refs[modality]) is not None
        parts = [(None, value)] if isinstance(value, torch.Tensor) else list(value.items())
        for key, tensor in parts:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{modality}: collated input {key!r} is a {type(tensor).__name__}, not a tensor")
            shape: list[int | str] = [BATCH, *tensor.shape[1:]]
            if sequence and tensor.ndim >= 2:
                shape[1] = f"{modality}_sequence"
            name = modality if key is None else f"{modality}.{key}"
            specs.append(InputSpec(name, modality, key, str(tensor.dtype).removeprefix("torch."), tuple(shape)))
    return specs


def flat_inputs(specs: Sequence[InputSpec], inputs: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    """A collated batch -> its tensors in `specs` order."""
    return tuple(inputs[s.modality] if s.key is None else inputs[s.modality][s.key] for s in specs)


class FlatModel(nn.Module):
    """The run's model as a function of flat tensors: `forward(*inputs)` -> one (B, C_t) logits tensor per task.

    Args:
        model: the run's model, in eval mode.
        specs: the flat inputs, in argument order.
    """

    def __init__(self, model: MultiTaskModel, specs: Sequence[InputSpec]) -> None:
        super().__init__()
        self.model = model
        self.specs = list(specs)
        self.tasks = list(model.heads)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs: dict[str, Any] = {}
        for spec, tensor in zip(self.specs, tensors, strict=True):
            if spec.key is None:
                inputs[spec.modality] = tensor
            else:
                inputs.setdefault(spec.modality, {})[spec.key] = tensor
        logits = self.model(inputs).logits
        return tuple(logits[t] for t in self.tasks)  # each (B, C_t)


class EncoderOnly(nn.Module):
    """One encoder as a function of its flat tensors (pooled features, tokens when it gives them): what
    `find_untraceable` exports alone to name the part of a model that cannot be exported."""

    def __init__(self, encoder: nn.Module, specs: Sequence[InputSpec]) -> None:
        super().__init__()
        self.encoder, self.specs = encoder, list(specs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(self.specs) == 1 and self.specs[0].key is None:
            out = self.encoder(tensors[0])
        else:
            out = self.encoder({s.key: t for s, t in zip(self.specs, tensors, strict=True)})
        return tuple(t for t in (out.pooled, out.tokens) if t is not None)
