"""A record's raw inputs without torch: file references confined to the data folder, image decoding, table cells,
vectors and texts, each refused in one line.

These are the data-side rules of the encoders (`encoders/base.py`, `image_common.py`, `tabular.py`, `embedding.py`,
`hf_text.py`), written with the standard library, numpy and PIL only (PIL imported when an image is read), so that
the ONNX predict engine (`mmfuse.export.feeds`) reads records exactly as the encoders do without importing torch.
This file is their one copy: the encoders import them from here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfuse.files import NotRegularFileError, open_regular
from mmfuse.text import is_blank, one_line

if TYPE_CHECKING:
    from PIL import Image

MAX_NAME_BYTES = 255  # a longer file or folder name cannot exist on common file systems
MAX_PATH_BYTES = 4096


class InputError(ValueError):
    """A bad input reference, as one line without the file and row (the data layer adds "FILE:ROW: ")."""


# ---------------------------------------------------------------------- file references
@dataclass(frozen=True)
class DataRoot:
    """The folder that file references in records are resolved against and confined to.

    Args:
        path: the data folder (relative references are joined to it).
        allow_outside: also accept absolute paths, `~` and `..` that leave the folder (`data.allow_outside_root`).
    """

    path: Path
    allow_outside: bool = False

    def resolve(self, value: str, what: str = "file") -> str:
        """A record's file reference -> an absolute, normalised path inside the data folder.

        Raises:
            InputError: for an absolute path, `~` or `..` that leaves the folder (unless `allow_outside`),
                a name over 255 bytes, a NUL byte.
        """
        text = value.strip()
        if "\x00" in text:
            raise InputError(f"{what} path {text[:60]!r} contains a NUL byte")
        encoded = os.fsencode(text) if _encodable(text) else None
        if encoded is None:
            raise InputError(f"{what} path {text[:60]!r} is not valid UTF-8 (a lone surrogate)")
        if len(encoded) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
            raise InputError(f"{what} path {text[:60]!r}... is too long (a name over {MAX_NAME_BYTES} bytes)")
        root = os.path.abspath(self.path)
        if self.allow_outside:
            return os.path.normpath(os.path.join(root, os.path.expanduser(text)))
        # Lexical confinement (as werkzeug's safe_join): links that the user placed in the folder are followed.
        full = os.path.normpath(os.path.join(root, text))
        if text.startswith("~") or os.path.commonpath([root, full]) != root:
            raise InputError(
                f"{what} path {text[:80]!r} is outside the data folder {root} "
                "(set data.allow_outside_root: true to allow it)"
            )
        return full


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def field_value(row: Mapping[str, Any], field: str) -> Any:
    """The value of `field` in a parsed row; None when the key is absent, null, or an empty/blank string."""
    value = row.get(field)
    return None if is_blank(value) else value


# ---------------------------------------------------------------------- images
_HIGH_DEPTH = ("I", "F")  # 32-bit integer and float images (16-bit modes "I;16*" open as these or convert to "I")


def _unit_scale(values: np.ndarray, mode: str) -> np.ndarray:
    """High-depth pixel values -> [0, 1]: by the mode's range when it is known, else by the data's own range.

    "I;16*" is 16-bit. For "I" and "F" the range is read off the values: within [0, 1] (float) is taken as
    is, within [0, 255] as 8-bit, within [0, 65535] as 16-bit; anything else (negative, larger) is stretched
    from its minimum to its maximum. NaN and infinities become 0.
    """
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if mode.startswith("I;16"):
        return values / 65535.0
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0 and high <= 1 and mode == "F":
        return values
    for top in (255.0, 65535.0):
        if low >= 0 and high <= top:
            return values / top
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def to_rgb_image(raw: Any) -> Image.Image:
    """A PIL image, an image file path or an (H, W[, C]) uint8 array, as an upright 8-bit RGB PIL image.

    EXIF orientation is applied. Every mode PNG, TIFF and JPEG files carry converts: 1, L, LA, P, PA, RGB,
    RGBA, CMYK, YCbCr as Pillow converts them (alpha dropped), and 16-bit, 32-bit integer and float images
    (I;16, I, F) scaled to 8 bits by their range (`_unit_scale`), not clipped.
    """
    from PIL import Image, ImageOps

    if isinstance(raw, (str, Path)):
        with open_regular(raw, "image") as f, Image.open(f) as img:  # a FIFO or a device is refused, not read
            return to_rgb_image(img)
    if isinstance(raw, np.ndarray):
        raw = Image.fromarray(raw)
    if not isinstance(raw, Image.Image):
        raise TypeError(f"expected a PIL image, an image path or a uint8 array, got {type(raw).__name__}")
    image = ImageOps.exif_transpose(raw) or raw
    if image.mode.startswith("I;16") or image.mode in _HIGH_DEPTH:
        unit = _unit_scale(np.asarray(image), image.mode)
        image = Image.fromarray(np.round(unit * 255.0).clip(0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def check_image(path: str) -> str | None:
    """None if `path` is an image file that decodes fully (and converts to RGB), else the reason it is not."""
    from PIL import Image

    p = Path(path)
    try:
        with open_regular(p, "image") as f, Image.open(f) as im:
            im.load()
            to_rgb_image(im)
    except FileNotFoundError:
        return f"image {p.name!r} not found (looked in {p.parent})"
    except NotRegularFileError as err:
        return f"image {p.name!r} is {str(err).rpartition(' is ')[2]} (looked in {p.parent})"
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return f"image {p.name!r} cannot be decoded ({type(err).__name__}: {str(err)[:120]}) at {p}"
    return None


def read_image_path(row: Mapping[str, Any], field: str, root: DataRoot) -> str | None:
    """The image file's absolute path, confined to the data folder; None when the field is null or empty."""
    value = field_value(row, field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"field {field!r} must be an image path, got {type(value).__name__} {value!r:.40}")
    return root.resolve(value, "image")


# ---------------------------------------------------------------------- texts
def text_problem(text: str) -> str | None:
    """None when `text` is valid Unicode text, else why not (a lone surrogate: no tokenizer takes it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"text has an invalid character {text[err.start]!r} (a lone surrogate) at position {err.start}"
    return None


def read_text(row: Mapping[str, Any], field: str) -> str | None:
    """The stripped text; None when the field is null or blank."""
    value = field_value(row, field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"text field {field!r} must be a string, got {type(value).__name__} {value!r:.40}")
    problem = text_problem(value)
    if problem:
        raise InputError(problem)
    return value.strip()


def check_text(ref: Any) -> str | None:
    """None when `ref` is a non-empty, valid text, else why not."""
    if not isinstance(ref, str):
        return f"text must be a string, got {type(ref).__name__}"
    if not ref.strip():
        return "text is empty or missing"
    return text_problem(ref)


# ---------------------------------------------------------------------- table cells
MISSING, UNKNOWN, FIRST = 0, 1, 2  # categorical indices: missing cell, unseen value, first vocabulary entry
FLOAT32_MAX = 3.4028234663852886e38  # larger cells would overflow the encoder's float32 inputs
# |z| of a numeric cell, in training standard deviations: beyond it a record is refused (a fitted encoder's `read`),
# and `preprocess` clamps to it. A training split of n rows never holds |z| > sqrt(n - 1), so 1e3 refuses nothing
# a training set of under a million rows could contain, while z * W stays far from float16/float32 overflow.
Z_MAX = 1e3


def is_missing(value: Any) -> bool:
    """None, an empty or blank string, and float NaN are missing cells."""
    return is_blank(value) or (isinstance(value, float) and math.isnan(value))


def parse_number(value: Any, column: str) -> float | None:
    """One numeric cell -> a finite float, or None when missing.

    Raises:
        ValueError: (one line naming the column) for text that is not a number, a bool, or an infinite value.
    """
    if is_missing(value):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"column {column!r}: expected a number, got {type(value).__name__} {value!r:.40}")
    if isinstance(value, int) and abs(value) > FLOAT32_MAX:  # before str()/float() of a huge int
        raise ValueError(f"column {column!r}: an integer of {value.bit_length()} bits is too large for float32")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"column {column!r}: {value!r:.40} is not a number") from None
    if math.isnan(number):
        return None
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise ValueError(f"column {column!r}: {value!r:.40} is not a finite number in float32's range")
    return number


def category_key(value: Any, column: str) -> str | None:
    """One categorical cell -> its vocabulary key, or None when missing; 3, 3.0 and "3" are the same key."""
    if is_missing(value):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if not isinstance(value, str | int | float):
        raise ValueError(f"column {column!r}: expected a category (text or number), got {type(value).__name__}")
    return str(value).strip()


def clamp_z(z: float) -> float:
    """A standardised cell clamped to +-`Z_MAX`."""
    return max(-Z_MAX, min(Z_MAX, z))


Stats = Mapping[str, Mapping[str, float]]  # {numeric column: {"mean", "std"}} of the training split
Cells = tuple[float | str | None, ...]  # a row's cells: numeric columns (floats), then categorical ones (keys)


def read_cells(
    row: Mapping[str, Any], field: str, numeric: Sequence[str], categorical: Sequence[str], stats: Stats
) -> Cells | None:
    """The row's cells (numbers parsed, categories as keys, None where missing), or None when every cell is
    missing. The cells come from `row[field]` when that is an object, else from the row.

    Raises:
        InputError: a bad cell, an object without any of the columns, or (with `stats`) a numeric cell more than
            `Z_MAX` training standard deviations from the mean.
    """
    nested = row.get(field)
    source = nested if isinstance(nested, Mapping) else row
    if isinstance(nested, Mapping) and nested and not any(c in nested for c in (*numeric, *categorical)):
        columns = ", ".join((*numeric, *categorical))
        raise InputError(f"field {field!r} holds an object without any of the columns {columns}")
    try:
        cells = tuple(parse_number(source.get(c), c) for c in numeric) + tuple(
            category_key(source.get(c), c) for c in categorical
        )
    except ValueError as err:
        raise InputError(str(err)) from None
    _check_range(cells, numeric, stats)
    return None if all(c is None for c in cells) else cells


def _check_range(cells: Cells, numeric: Sequence[str], stats: Stats) -> None:
    for col, value in zip(numeric, cells, strict=False):
        stat = stats.get(col)
        if stat is None or value is None:
            continue
        z = (float(value) - stat["mean"]) / stat["std"]
        if abs(z) > Z_MAX:
            raise InputError(
                f"column {col!r}: {value:g} is {abs(z):.3g} standard deviations from the training mean "
                f"({stat['mean']:.6g}, std {stat['std']:.6g}); the model answers within {Z_MAX:g}"
            )


def vocab_lookup(vocab: Mapping[str, Sequence[str]]) -> dict[str, dict[str, int]]:
    """{column: its training vocabulary} -> {column: {key: index}}, the first entry at `FIRST`."""
    return {c: {v: FIRST + i for i, v in enumerate(vocab.get(c, []))} for c in vocab}


def table_codes(
    row: Mapping[str, Any],
    numeric: Sequence[str],
    categorical: Sequence[str],
    stats: Stats,
    lookup: Mapping[str, Mapping[str, int]],
) -> tuple[list[float], list[bool], list[int]]:
    """One row `{column: cell}` -> (z, present, codes): numeric (N,) standardised values in float64, clamped to
    +-`Z_MAX` (0 where missing or without statistics), (N,) whether each numeric cell is present, categorical (C,)
    indices (`MISSING`, `UNKNOWN`, `FIRST`.. the vocabulary, `lookup` from `vocab_lookup`)."""
    values = [parse_number(row.get(c), c) for c in numeric]
    z = [0.0 if v is None or c not in stats else clamp_z((v - stats[c]["mean"]) / stats[c]["std"])
         for c, v in zip(numeric, values, strict=True)]  # fmt: skip
    codes = []
    for col in categorical:
        key = category_key(row.get(col), col)
        codes.append(MISSING if key is None else lookup.get(col, {}).get(key, UNKNOWN))
    return z, [v is not None for v in values], codes


# ---------------------------------------------------------------------- vectors
def as_vector(raw: Any, dim: int) -> np.ndarray:
    """A sequence of numbers or an array (a torch tensor too) -> a float32 (dim,) array.

    Raises:
        ValueError: one line saying what is wrong (not numbers, wrong length, a non-finite value).
    """
    tensor = hasattr(raw, "detach") and hasattr(raw, "numpy")  # a torch.Tensor, without importing torch
    if isinstance(raw, str | bytes) or not (isinstance(raw, Sequence | np.ndarray) or tensor):
        raise ValueError(f"expected a vector of {dim} numbers, got {type(raw).__name__}")
    if isinstance(raw, Sequence) and any(isinstance(x, bool) or not isinstance(x, int | float) for x in raw):
        raise ValueError(f"expected a vector of {dim} numbers, got a list holding non-numbers")
    array = np.asarray(raw.detach().cpu().numpy() if tensor else raw)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"expected a vector of {dim} numbers, got an array of dtype {array.dtype}")
    if array.ndim != 1 or array.shape[0] != dim:
        raise ValueError(f"expected a vector of {dim} numbers, got shape {tuple(array.shape)}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"vector element {bad} is {array[bad]} (not finite)")
    return array


def load_npy(path: str) -> np.ndarray:
    """Read a `.npy` file strictly: the npy format only (no zip archives), never unpickling objects.

    Raises:
        ValueError: one line (not found, not a regular file, not a readable array).
    """
    try:
        with open_regular(path) as f:  # a FIFO or a device is refused, never waited on
            return np.lib.format.read_array(f, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except NotRegularFileError as err:
        raise ValueError(str(err).replace(f"file {path} is", "the file is")) from None
    except (OSError, EOFError, ValueError) as err:
        raise ValueError(f"not a readable .npy array ({one_line(err, 100)})") from None


def is_float(value: Any) -> bool:
    """Whether `float(value)` succeeds."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


VectorRef = str | tuple[float, ...]  # an absolute .npy path, or the vector's values


def read_vector(
    row: Mapping[str, Any],
    field: str,
    root: DataRoot,
    dim: int,
    columns: Sequence[str] | None = None,
    prefix: str | None = None,
) -> VectorRef | None:
    """A list of numbers -> its values; a string -> the `.npy` path under the data root; a column group (`columns`,
    or every column named `prefix` + a number, by that number) -> its cells as numbers. None when the vector is
    missing (null, empty, or every cell of the group empty).

    Raises:
        InputError: one line naming the field or the columns.
    """
    if columns is not None or prefix is not None:
        return _read_vector_columns(row, dim, columns, prefix or "")
    value = row.get(field)
    if is_blank(value):
        return None
    if isinstance(value, str):
        path = root.resolve(value, "embedding")
        if not path.lower().endswith(".npy"):
            raise InputError(f"field {field!r}: {value.strip()[:80]!r} is not a .npy file (give a list of numbers)")
        return path
    if not isinstance(value, list):
        raise InputError(f"field {field!r}: expected {dim} numbers or a .npy path, got {type(value).__name__}")
    return _vector_values(value, dim, f"field {field!r}")


def _vector_values(raw: Any, dim: int, what: str) -> tuple[float, ...]:
    try:
        as_vector(raw, dim)  # validates; the reference keeps the numbers as given (float64)
        return tuple(float(x) for x in raw)
    except ValueError as err:
        raise InputError(f"{what}: {err}") from None


def _read_vector_columns(
    row: Mapping[str, Any], dim: int, columns: Sequence[str] | None, prefix: str
) -> tuple[float, ...] | None:
    if columns is not None:
        names = list(columns)
    else:
        numbered = [(int(k[len(prefix) :]), k) for k in row if k.startswith(prefix) and k[len(prefix) :].isdigit()]
        names = [k for _, k in sorted(numbered)]
    what = f"columns {names[0]}..{names[-1]}" if names else f"columns {prefix}<n>"
    cells = [row.get(n) for n in names]
    empty = [n for n, c in zip(names, cells, strict=True) if is_blank(c)]
    if len(empty) == len(names):
        return None
    if empty:
        raise InputError(f"{what}: cell {empty[0]!r} is empty (a vector is all present or all empty)")
    for name, cell in zip(names, cells, strict=True):
        if isinstance(cell, bool) or not is_float(cell):
            raise InputError(f"{what}: cell {name!r} = {cell!r:.40} is not a number")
    return _vector_values([float(c) for c in cells], dim, what)


def check_vector(ref: Any, dim: int) -> str | None:
    """A `.npy` path: None when the file holds a numeric (dim,) array of finite values, loadable without pickle,
    else "PATH: why not". The values of a list were checked by `read_vector`: None."""
    if not isinstance(ref, str):
        return None
    try:
        as_vector(load_npy(ref), dim)
    except ValueError as err:
        return f"{ref}: {err}"
    return None
