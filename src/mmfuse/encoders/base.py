"""Encoder contract.

Shapes: B batch, T tokens, D feature size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmfuse.registry import Registry

ENCODERS: Registry[type[Encoder]] = Registry("encoder")


@dataclass
class EncoderOutput:
    """What every encoder returns.

    Attributes:
        pooled: (B, D) one vector per sample.
        tokens: (B, T, D) token or spatial features, or None when the encoder does not expose them.
        mask: (B, T) bool, True for real tokens, or None (all tokens real).
        present: (B,) bool, False where the sample lacks this modality, or None (all present).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    present: torch.Tensor | None = None

    def detach(self) -> EncoderOutput:
        return EncoderOutput(*(t.detach() if t is not None else None for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor | None, ...]:
        return (self.pooled, self.tokens, self.mask, self.present)

    def without(self, absent: torch.Tensor) -> EncoderOutput:
        """Mark the samples where `absent` (B,) is True as missing: zero features, mask out every token.

        Fusions then see exact zeros for a missing modality (and cross-attention no key at all).
        """
        keep = ~absent
        present = keep if self.present is None else self.present & keep
        pooled = self.pooled * present.unsqueeze(-1).to(self.pooled.dtype)
        tokens, mask = self.tokens, self.mask
        if tokens is not None:
            tokens = tokens * present.view(-1, 1, 1).to(tokens.dtype)
            base = mask if mask is not None else torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            mask = base & present.unsqueeze(-1)
        return EncoderOutput(pooled, tokens, mask, present)


class Encoder(nn.Module):
    """Base class of every encoder: a plain module that also owns its preprocessing.

    Subclasses set `output_dim` from the built network (tokens, when given, have that size too),
    implement `forward(inputs) -> EncoderOutput`,
    `preprocess(raw)` for one sample (a PIL image, a string) and `collate(items)` for a list of
    preprocessed samples. `modality` is "image" or "text".
    """

    modality: str = ""
    output_dim: int

    def __init__(self, freeze: bool = False) -> None:
        super().__init__()
        self.frozen = freeze
        self._weights_id: str | None = None  # memo of weights_identity(); reset whenever weights are loaded
        self.register_load_state_dict_post_hook(_forget_weights_identity)

    def finish_init(self) -> None:
        """Call at the end of a subclass `__init__`: applies `freeze`."""
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> Encoder:
        # A frozen encoder stays in eval mode so BatchNorm statistics and dropout do not move.
        return super().train(mode and not self.frozen)

    def preprocess(self, raw: Any, train: bool = False) -> Any:
        """One raw sample (PIL image, string) -> what `collate` takes; `train` enables augmentation."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        raise NotImplementedError

    def cache_key(self) -> str:
        """A string naming everything that decides this encoder's output for a given input."""
        raise NotImplementedError

    def weights_identity(self) -> str:
        """Names the weights: a file's content hash, or "random:<hash of the state>" for random init."""
        raise NotImplementedError

    @property
    def rebuilt_from_config(self) -> bool:
        """True when the config alone rebuilds these exact weights (frozen, loaded from a file), so
        checkpoints can leave them out."""
        return self.frozen and not self.weights_identity().startswith("random:")

    def forward(self, inputs: Any) -> EncoderOutput:
        raise NotImplementedError


def _forget_weights_identity(module: nn.Module, incompatible_keys: object) -> None:
    # Randomly initialised weights are named by a hash of their values: after a load, hash them again.
    # (Weights named by their file keep that name: a frozen encoder's checkpoint holds the same values.)
    if (module._weights_id or "").startswith("random:"):
        module._weights_id = None
