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


# ---------------------------------------------------------------------- texts
def text_problem(text: str) -> str | None:
    """None when `text` is valid Unicode text, else why not (a lone surrogate: no tokenizer takes it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"text has an invalid character {text[err.start]!r} (a lone surrogate) at position {err.start}"
    return None


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
