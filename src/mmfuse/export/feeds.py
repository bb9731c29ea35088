"""Feeding an exported model without torch: one `Feed` per input, built from `export.json`, that reads a record's
field(s), checks and loads the input and collates a batch into the graph's named numpy arrays, as the run's encoder
does (its `read`, `check`, `load`, `preprocess` and `collate`; `mmfuse.raw_inputs` holds their shared rules).

Shapes: B batch, S image side, T tokens (padded to the longest text in the batch), N numeric and C categorical
columns, E vector size.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mmfuse.raw_inputs import (
    Cells,
    DataRoot,
    VectorRef,
    as_vector,
    check_image,
    check_text,
    check_vector,
    load_npy,
    read_cells,
    read_image_path,
    read_text,
    read_vector,
    table_codes,
    to_rgb_image,
    vocab_lookup,
)

Arrays = dict[str, np.ndarray]  # {graph input name: (B, ...) array}
PIL_FILTERS = {"nearest": 0, "nearest-exact": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


class Feed:
    """One input of the exported graph: a modality's record field(s) -> its collated arrays.

    Args:
        modality: the modality's name (graph inputs are `modality` or `modality.key`).
        pre: its `preprocessing` entry in export.json.
        row_keys: the record fields it reads (`reading.inputs.<modality>.row_keys`).
        folder: the export folder (files written beside the model, such as a tokenizer).
    """

    def __init__(self, modality: str, pre: Mapping[str, Any], row_keys: list[str], folder: Path) -> None:
        self.modality, self.pre, self.row_keys, self.folder = modality, pre, list(row_keys), folder

    def read(self, row: Mapping[str, Any], field: str, root: DataRoot) -> Hashable | None:
        """The reference in a parsed row, or None when the row lacks the input. Raises InputError (one line)."""
        raise NotImplementedError

    def check(self, ref: Hashable) -> str | None:
        """None when the reference loads, else why not."""
        return None

    def load(self, ref: Hashable) -> Any:
        """The preprocessed item of one reference."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Arrays:
        """Items -> {graph input name: (B, ...) array}."""
        raise NotImplementedError


class ImageFeed(Feed):
    """An image file: RGB, the shorter side resized to S, centre-cropped to S x S, [0, 1], (x - mean) / std."""

    def __init__(self, modality: str, pre: Mapping[str, Any], row_keys: list[str], folder: Path) -> None:
        super().__init__(modality, pre, row_keys, folder)
        self.size = int(pre["image_size"])
        self.filter = PIL_FILTERS[pre["interpolation"]]
        self.mean = np.asarray(pre["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(pre["std"], np.float32).reshape(3, 1, 1)

    def read(self, row: Mapping[str, Any], field: str, root: DataRoot) -> str | None:
        return read_image_path(row, field, root)

    def check(self, ref: Hashable) -> str | None:
        return check_image(str(ref))

    def load(self, ref: Hashable) -> np.ndarray:
        """(3, S, S) float32, as torchvision's Resize(S) + CenterCrop(S) on the PIL image, ToDtype, Normalize."""
        image, s = to_rgb_image(str(ref)), self.size
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)  # (width, height)
        if size != (w, h):
            image = image.resize(size, resample=self.filter)
        w, h = image.size
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        pixels = np.asarray(image.crop((left, top, left + s, top + s)), dtype=np.uint8)  # (S, S, 3)
        x = pixels.transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255)  # (3, S, S)
        return (x - self.mean) / self.std

    def collate(self, items: list[np.ndarray]) -> Arrays:
        return {self.modality: np.stack(items)}  # (B, 3, S, S)


class TextFeed(Feed):
    """A text: stripped, then the run's fast tokenizer (`<modality>.tokenizer.json` beside the model) with the
    encoder's truncation and padding to the longest text of the batch."""

    def __init__(self, modality: str, pre: Mapping[str, Any], row_keys: list[str], folder: Path) -> None:
        from tokenizers import Tokenizer

        super().__init__(modality, pre, row_keys, folder)
        self.tokenizer = Tokenizer.from_file(str(folder / pre["tokenizer_file"]))
        truncation, padding = pre["truncation"], pre["padding"]
        self.tokenizer.enable_truncation(
            int(pre["max_length"]), stride=0, strategy=truncation["strategy"], direction=truncation["direction"]
        )
        self.tokenizer.enable_padding(
            direction=padding["direction"], pad_id=padding["pad_id"], pad_type_id=padding["pad_type_id"],
            pad_token=padding["pad_token"],
        )  # fmt: skip

    def read(self, row: Mapping[str, Any], field: str, root: DataRoot) -> str | None:
        return read_text(row, field)

    def check(self, ref: Hashable) -> str | None:
        return check_text(ref)

    def load(self, ref: Hashable) -> str:
        return str(ref).strip()

    def collate(self, items: list[str]) -> Arrays:
        encodings = self.tokenizer.encode_batch(items)
        m = self.modality
        return {
            f"{m}.input_ids": np.array([e.ids for e in encodings], dtype=np.int64),  # (B, T)
            f"{m}.token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            f"{m}.attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }


class TableFeed(Feed):
    """A table row: numeric cells standardised with the training statistics (clamped to +-Z_MAX, 0 where missing),
    categorical cells as indices (0 missing, 1 unknown, 2.. the training vocabulary)."""

    def __init__(self, modality: str, pre: Mapping[str, Any], row_keys: list[str], folder: Path) -> None:
        super().__init__(modality, pre, row_keys, folder)
        self.numeric, self.categorical = list(pre["numeric"]), list(pre["categorical"])
        self.stats = pre.get("stats") or {}
        self.lookup = vocab_lookup(pre.get("categories") or {})

    @property
    def columns(self) -> list[str]:
        return self.numeric + self.categorical

    def read(self, row: Mapping[str, Any], field: str, root: DataRoot) -> Cells | None:
        return read_cells(row, field, self.numeric, self.categorical, self.stats)

    def load(self, ref: Hashable) -> tuple[list[float], list[bool], list[int]]:
        cells = dict(zip(self.columns, ref, strict=True))  # type: ignore[arg-type]
        return table_codes(cells, self.numeric, self.categorical, self.stats, self.lookup)

    def collate(self, items: list[tuple[list[float], list[bool], list[int]]]) -> Arrays:
        m, b = self.modality, len(items)
        return {
            f"{m}.numeric": np.array([i[0] for i in items], dtype=np.float32).reshape(b, len(self.numeric)),
            f"{m}.numeric_present": np.array([i[1] for i in items], dtype=bool).reshape(b, len(self.numeric)),
            f"{m}.categorical": np.array([i[2] for i in items], dtype=np.int64).reshape(b, len(self.categorical)),
        }


class VectorFeed(Feed):
    """A precomputed vector of `dim` numbers: a list in the record, a `.npy` file, or a group of CSV columns."""

    def __init__(self, modality: str, pre: Mapping[str, Any], row_keys: list[str], folder: Path) -> None:
        super().__init__(modality, pre, row_keys, folder)
        self.dim, self.columns, self.prefix = int(pre["dim"]), pre.get("columns"), pre.get("prefix")

    def read(self, row: Mapping[str, Any], field: str, root: DataRoot) -> VectorRef | None:
        return read_vector(row, field, root, self.dim, self.columns, self.prefix)

    def check(self, ref: Hashable) -> str | None:
        return check_vector(ref, self.dim)

    def load(self, ref: Hashable) -> np.ndarray:
        raw = load_npy(ref) if isinstance(ref, str) else np.asarray(ref, dtype=np.float32)
        return as_vector(raw, self.dim)

    def collate(self, items: list[np.ndarray]) -> Arrays:
        return {self.modality: np.stack(items)}  # (B, E)


FEEDS = {"image_file": ImageFeed, "text": TextFeed, "table": TableFeed, "vector": VectorFeed}
