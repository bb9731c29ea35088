"""Any Hugging Face `AutoModel` as a text encoder; by default the packaged MiniLM (6-layer BERT, 384-d).

Shapes: B batch, T tokens (padded to the longest text in the batch), H hidden size.
Everything loads from local files: there is no network, so hub names are refused with a clear error.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import torch

from mmfuse.assets import dir_sha256, minilm_dir, module_sha256, unsafe_pickle_message
from mmfuse.encoders.base import ENCODERS, Encoder, EncoderOutput
from mmfuse.files import NotRegularFileError, check_folder
from mmfuse.fusion.attention import masked_mean
from mmfuse.raw_inputs import DataRoot, check_text, read_text

logger = logging.getLogger(__name__)

PACKAGED_MODELS: dict[str, Callable[[], Path]] = {"minilm": minilm_dir}
POOLINGS = ("cls", "mean", "pooler")
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def resolve_model_dir(name: str, what: str = "model") -> Path:
    """A packaged short name ("minilm") or a local directory -> the directory.

    Raises:
        FileNotFoundError: for anything else (a hub id cannot be downloaded here).
        ValueError: for a directory holding a FIFO, a socket or a device (loading it would hang).
    """
    if name in PACKAGED_MODELS:
        return PACKAGED_MODELS[name]()
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            check_folder(path, f"hf_text {what} folder")
        except NotRegularFileError as err:
            raise ValueError(str(err)) from None
        return path
    raise FileNotFoundError(
        f"hf_text {what} {name!r} is neither a local directory nor a packaged model ({', '.join(PACKAGED_MODELS)}). "
        f"Downloads from the Hugging Face Hub are impossible here (no network): download it on a machine with "
        f"internet (e.g. `huggingface-cli download {name} --local-dir ./{path.name}`), copy the directory here "
        f"and pass `{what}: /path/to/that/directory`."
    )


def _build_model(directory: Path | None, config: dict[str, Any] | None) -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel

    if config is None:
        try:
            return AutoModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
        except pickle.UnpicklingError:
            raise ValueError(unsafe_pickle_message(f"a weights file in hf_text model folder {directory}")) from None
    kwargs = dict(config)
    if "model_type" not in kwargs:
        raise ValueError("hf_text config needs a `model_type` key, e.g. {'model_type': 'bert', 'hidden_size': 32}")
    return AutoModel.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))


def _build_tokenizer(directory: Path) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, use_fast=True, local_files_only=True)
    if not tokenizer.is_fast:
        logger.warning("no fast tokenizer in %s; using the slow one", directory)
    return tokenizer


@ENCODERS.register("hf_text")
class HFTextEncoder(Encoder):
    """A Hugging Face text model: `last_hidden_state` as tokens plus a CLS, mean or pooler vector.

    Args:
        model: a local model directory or a packaged short name ("minilm").
        config: instead of pretrained weights, build a randomly initialised model from these config
            kwargs (with `model_type`, e.g. a 2-layer 32-d BERT for tests).
        tokenizer: a local tokenizer directory or short name; defaults to `model`'s.
        pooling: "cls" (first token), "mean" (over real tokens only) or "pooler" (the model's pooler_output).
        max_length: texts are truncated to this many tokens.
        freeze: no gradients and always eval mode.
        unfreeze: None (the `freeze` flag decides), 0 (frozen), or N: only the last N blocks train, the others are
            frozen and stay in eval mode. Blocks: the embeddings, each transformer layer (the model's longest
            `nn.ModuleList`), and the pooler when pooling is "pooler" (MiniLM: 7, or 8 with the pooler).
    """

    modality = "text"

    def __init__(
        self,
        model: str = "minilm",
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        pooling: str = "mean",
        max_length: int = 128,
        freeze: bool = False,
        unfreeze: int | None = None,
    ) -> None:
        super().__init__(freeze, unfreeze)
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.model_name, self.model_config, self.pooling, self.max_length = model, config, pooling, max_length
        # resolve both directories before building anything, so a bad name fails fast
        self._model_dir = resolve_model_dir(model) if config is None else None
        self._tokenizer_dir = resolve_model_dir(tokenizer or model, "tokenizer" if tokenizer else "model")
        self.model = _build_model(self._model_dir, config)
        self.tokenizer = _build_tokenizer(self._tokenizer_dir)
        self.output_dim = int(self.model.config.hidden_size)
        self._input_keys = [k for k in _INPUT_KEYS if k in inspect.signature(self.model.forward).parameters]
        self._weights_id: str | None = None
        self._check_fit()
        self.model.train(self.training)  # from_pretrained returns eval mode; follow nn.Module's default
        self.finish_init()

    def _check_fit(self) -> None:
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise ValueError(
                f"tokenizer in {self._tokenizer_dir} has {len(self.tokenizer)} tokens but the model's vocab_size is "
                f"{self.model.config.vocab_size}; set vocab_size >= {len(self.tokenizer)} or use a matching tokenizer"
            )
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and self.max_length > limit:
            raise ValueError(f"max_length {self.max_length} exceeds the model's max_position_embeddings {limit}")
        if self.pooling == "pooler":
            with torch.no_grad():
                probe = self.collate(["probe"])
                out = self.model.eval()(**{k: probe[k] for k in self._input_keys if k in probe})
            if getattr(out, "pooler_output", None) is None:
                raise ValueError(f"pooling='pooler': {type(self.model).__name__} has no pooler_output; use cls or mean")

    @property
    def has_tokens(self) -> bool:
        return True

    def blocks(self) -> list[torch.nn.Module]:
        """Embeddings, the transformer layers in order, and the pooler when `pooling` reads it."""
        lists = [m for m in self.model.modules() if isinstance(m, torch.nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
        embeddings = getattr(self.model, "embeddings", None) or self.model.get_input_embeddings()
        pooler = getattr(self.model, "pooler", None) if self.pooling == "pooler" else None
        return [embeddings, *layers, *([pooler] if pooler is not None else [])]

    def read(self, row: Mapping[str, Any], field: str, root: DataRoot) -> str | None:
        """The stripped text; None when the field is null or blank."""
        return read_text(row, field)

    def check(self, ref: Hashable) -> str | None:
        return check_text(ref)

    def length(self, ref: Hashable) -> int:
        return len(ref)  # characters: a cheap stand-in for tokens when batching by length

    def placeholder(self) -> str:
        return ""

    def preprocess(self, raw: Any, train: bool = False) -> str:
        """One text -> the stripped string (`train` is accepted for a uniform call and changes nothing)."""
        if not isinstance(raw, str):
            raise TypeError(f"hf_text expects a string, got {type(raw).__name__}")
        return raw.strip()

    def collate(self, items: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> input_ids, attention_mask (and token_type_ids), each (B, T), padded to the longest text."""
        batch = self.tokenizer(
            list(items), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return dict(batch)

    def forward(self, inputs: dict[str, torch.Tensor]) -> EncoderOutput:
        """Tokenised batch -> pooled (B, H), tokens (B, T, H), mask (B, T) True for real tokens."""
        out = self.model(**{k: inputs[k] for k in self._input_keys if k in inputs})
        tokens = out.last_hidden_state  # (B, T, H)
        mask = inputs["attention_mask"].bool()  # (B, T)
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "mean":
            pooled = masked_mean(tokens, mask)  # (B, H)
        else:
            pooled = out.pooler_output
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=mask)

    def weights_digest(self) -> str:
        if self._model_dir is not None:
            return "sha256:" + dir_sha256(self._model_dir)
        return "random:" + module_sha256(self.model)

    def cache_key(self) -> str:
        """Class, model, weights identity (content hashes), tokenizer files, pooling and max_length.

        The key describes the weights as built; cache only frozen encoders' features.
        """
        return (
            f"{type(self).__name__}:model={self.model_name}:weights={self.weights_identity()}:"
            f"tokenizer=sha256:{dir_sha256(self._tokenizer_dir)}:pooling={self.pooling}:max_length={self.max_length}"
        )
