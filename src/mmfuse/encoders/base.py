"""Encoder contract: the network side (`forward -> EncoderOutput`) and the data side (everything
modality-specific about an input, from a record's field to a collated batch).

Shapes: B batch, T tokens, D feature size.

The data path never branches on a modality's name; it asks the modality's encoder:

```
row (parsed JSONL object / CSV row)
  -> encoder.read(row, field, root)   -> reference (hashable: a path, a string, a tuple of cells) or None (missing)
  -> encoder.check(ref)               -> None, or a one-line reason the reference is bad (validated up front)
  -> encoder.content_hash(ref)        -> key of the feature cache (file bytes for a path, the value otherwise)
  -> encoder.load(ref)                -> raw sample (a decoded PIL image, the string, ...)
  -> encoder.preprocess(raw, train)   -> one item (a tensor, a string, ...)
  -> encoder.collate(items)           -> the batch input of `forward`
  -> encoder(batch)                   -> EncoderOutput
```

A missing input (`read` returned None) becomes `encoder.placeholder()` in the batch, and the model turns
it into exact zeros through the batch's `absent` mask. `length(ref)` orders batches by length; `fit(refs)`
learns options from the training split (standardisation statistics, vocabularies) that are written into
the run's resolved config, so the config alone rebuilds the same encoder.

The data-side methods run in DataLoader worker processes and in threads: they must not use or change the
network's weights, and they must only read files under the data root (`DataRoot.resolve`). `DataRoot`, `InputError`
and `field_value` live in `mmfuse.raw_inputs` (torch-free, shared with the ONNX engine) and are imported here.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmfuse.assets import module_sha256
from mmfuse.io import sha256_file, sha256_text
from mmfuse.raw_inputs import DataRoot, InputError, field_value
from mmfuse.registry import Registry

ENCODERS: Registry[type[Encoder]] = Registry("encoder")


def hash_value(value: Any) -> str:
    """A stable content hash of a plain value (str, number, bool, or tuples/lists of them)."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)  # ASCII
    return sha256_text(text)[:32]


def hash_file(path: str) -> str:
    """A content hash of a file's bytes (so a renamed copy hits the cache, an edited file misses it)."""
    return sha256_file(path)[:32]  # never blocks on a FIFO or a device


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

    def select(self, index: torch.Tensor) -> EncoderOutput:
        """Rows `index` (B,) long of every field: (U, ...) features of distinct inputs -> (B, ...) per record.

        `index_select`'s backward adds the gradients of the rows that share an input into its one row.
        """
        return EncoderOutput(*(t.index_select(0, index) if t is not None else None for t in self.as_tuple()))


@dataclass
class UniqueInputs:
    """A batch's input of one modality with each distinct input once: what `collate` made of the U distinct
    items, and the row of each record among them.

    Attributes:
        unique: the encoder's collated input of the U distinct items (U <= B).
        index: (B,) long, record b's input is row `index[b]` of `unique`.
    """

    unique: Any
    index: torch.Tensor


class Encoder(nn.Module):
    """Base class of every encoder: a plain module that also owns everything about its input.

    Network side: set `output_dim` from the built network (tokens, when given, have that size too) and
    implement `forward(inputs) -> EncoderOutput`, `cache_key()` and `weights_identity()`.

    Data side (see the module docstring for the flow): `read`, `check`, `load`, `content_hash`, `length`,
    `placeholder`, `fit`, `preprocess`, `collate`. The defaults below suit an input that is one plain value
    in one field; a file-backed input overrides `read` (resolve the path with `root.resolve`), `check`,
    `load` and `content_hash`.

    Class attributes:
        modality: the kind of input ("image", "text", "tabular", "embedding"); informational (`mmfuse list`,
            messages). The model's modality NAMES are the config's keys and may be anything.
        groups_records: references name shared objects (image files): records with the same reference
            are split together by default and reported when they leak from train into test.
        augment: preprocessing is random in training (such an encoder's features cannot be cached).
        file_suffixes: the name endings a file reference must have, if any (the server names an upload with
            the first).
    """

    modality: str = ""
    groups_records: bool = False
    augment: bool = False
    file_suffixes: tuple[str, ...] = ()
    output_dim: int

    def __init__(self, freeze: bool = False, unfreeze: int | None = None) -> None:
        super().__init__()
        if unfreeze is not None and (isinstance(unfreeze, bool) or not isinstance(unfreeze, int) or unfreeze < 0):
            raise ValueError(f"unfreeze must be a number of blocks >= 0 (0: frozen) or null, got {unfreeze!r}")
        if freeze and unfreeze:
            raise ValueError(
                f"freeze: true and unfreeze: {unfreeze} contradict each other; drop freeze to fine-tune the last "
                f"{unfreeze} blocks, or drop unfreeze to keep the whole encoder frozen"
            )
        # `frozen`: the WHOLE encoder is frozen (its features may be cached); a partly unfrozen one is trainable.
        self.frozen = freeze or unfreeze == 0
        self.unfreeze = unfreeze if unfreeze else None  # N > 0: only the last N of `blocks()` train
        self._weights_id: str | None = None  # memo of weights_identity(); reset whenever weights are loaded
        self.register_load_state_dict_post_hook(_forget_weights_identity)

    def finish_init(self) -> None:
        """Call at the end of a subclass `__init__`: applies `freeze`, or `unfreeze` (the last N blocks train)."""
        if self.frozen:
            self.requires_grad_(False)
            self.eval()
        elif self.unfreeze:
            self.requires_grad_(False)
            for block in self._unfrozen_blocks():
                block.requires_grad_(True)
            self.train(self.training)

    def blocks(self) -> list[nn.Module]:
        """The network's blocks in order from input to output: what `unfreeze: N` counts from the top and what
        layer-wise learning-rate decay ranks (`train.layer_decay`). Each family says what a block is (a stage of
        a CNN, a transformer layer); parameters in no block count as the lowest block. Default: none (such an
        encoder refuses `unfreeze`, and layer decay gives it one learning rate)."""
        return []

    def _unfrozen_blocks(self) -> list[nn.Module]:
        """The last `unfreeze` blocks. Raises ValueError (one line with the count) when there are fewer."""
        blocks = self.blocks()
        if not blocks:
            raise ValueError(f"unfreeze: {type(self).__name__} has no blocks to unfreeze; use freeze instead")
        if self.unfreeze is None or self.unfreeze > len(blocks):
            raise ValueError(
                f"unfreeze: {self.unfreeze} exceeds the {len(blocks)} blocks of this encoder; "
                f"use 1..{len(blocks)} (or freeze: false to train it all)"
            )
        return blocks[-self.unfreeze :]

    def train(self, mode: bool = True) -> Encoder:
        # A frozen encoder, and the frozen blocks of a partly unfrozen one, stay in eval mode so that BatchNorm
        # statistics and dropout do not move.
        super().train(mode and not self.frozen and not self.unfreeze)
        if mode and self.unfreeze:
            self.training = True
            for block in self._unfrozen_blocks():
                block.train(True)
        return self

    # ------------------------------------------------------------------ data side
    def fields(self, field: str) -> list[str]:
        """The row keys (JSONL keys, CSV columns) this encoder reads when configured with `field`.

        Used to name what a record lacks and to refuse a file that has none of them. Default: `[field]`.
        """
        return [field]

    def read(self, row: Mapping[str, Any], field: str, root: DataRoot) -> Hashable | None:
        """The reference to this input in one parsed row, or None when the row lacks it (a missing input).

        A reference must be hashable and cheap (a path, a string, a tuple of cells): records are grouped,
        deduplicated and cached by it. Only check the value's form here (type, path confinement); decoding
        belongs in `check`.

        Args:
            row: the parsed record: a JSON object, or a CSV row {column: cell string}.
            field: the configured field (`model.encoders.<modality>.field`, default the modality's name).
            root: resolve and confine file paths with `root.resolve(value)`.

        Raises:
            InputError: one line saying what is wrong with the value.
        """
        value = field_value(row, field)
        if value is None:
            return None
        if not isinstance(value, str):
            raise InputError(f"field {field!r} must be a string, got {type(value).__name__} {value!r:.40}")
        return value

    def check(self, ref: Hashable) -> str | None:
        """None when `ref` can be loaded and preprocessed, else a one-line reason (run once per distinct
        reference before training, possibly in threads). Default: always fine."""
        return None

    def load(self, ref: Hashable) -> Any:
        """Reference -> the raw sample `preprocess` takes (decode a file, convert cells). Default: `ref` itself."""
        return ref

    def content_hash(self, ref: Hashable) -> str:
        """A hash of the input's content, the feature cache's key (with `cache_key()`).

        Default: a hash of the value; a file reference hashes the file's bytes (`hash_file`).
        """
        return hash_value(ref)

    def length(self, ref: Hashable) -> int | None:
        """The input's length, for batches of similar length (less padding), or None: no notion of length."""
        return None

    def placeholder(self) -> Any:
        """A preprocessed item that stands in for a missing input in `collate` (its features are zeroed)."""
        raise NotImplementedError(f"{type(self).__name__} does not say what a missing input looks like")

    def fit(self, refs: Sequence[Hashable]) -> dict[str, Any]:
        """Options learned from the training split's (non-missing) references, e.g. {"stats": {...}}.

        The builder rebuilds the encoder with these options added to its config options and writes them into
        the run's resolved config.yaml, so `load_run` rebuilds the same encoder without the data. Return {}
        when nothing needs learning, and when the options are already set (a resumed or loaded run): the
        encoder must therefore be constructible without them. Default: {}.
        """
        return {}

    def preprocess(self, raw: Any, train: bool = False) -> Any:
        """One raw sample (PIL image, string) -> what `collate` takes; `train` enables augmentation."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        """Preprocessed items (placeholders included) -> the input of `forward`."""
        raise NotImplementedError

    @property
    def has_tokens(self) -> bool:
        """Whether `forward` returns tokens (the feature cache keeps them when a fusion reads tokens)."""
        return False

    # ------------------------------------------------------------------ network side
    def cache_key(self) -> str:
        """A string naming everything that decides this encoder's output for a given input."""
        raise NotImplementedError

    def weights_identity(self) -> str:
        """Names the weights: a file's content hash, or "random:<hash of the state>" for random init (memoised)."""
        if self._weights_id is None:
            self._weights_id = self.weights_digest()
        return self._weights_id

    def weights_digest(self) -> str:
        """Computes `weights_identity`: "sha256:<hash of the file(s)>" for weights read from files, else
        "random:<hash of the state>". The default is the latter, for encoders whose weights never come from a file."""
        return "random:" + module_sha256(self)

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
