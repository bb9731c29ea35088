"""Request bodies -> the run's records, or one `RequestError` line with an HTTP status.

A record is a JSON object of the run's input fields, as in a records file. A field that its encoder reads
as a FILE (an image, ...) carries the file's bytes, never a path: base64 in a JSON string (a `data:` URL
works too) or a multipart file part. The bytes are written to the server's private upload folder under a
name the server makes up, and the record is read with that folder as its confined data root, so a client
cannot make the server open one of its own files (`"image": "/etc/passwd"` is taken as base64, fails to
decode, and is refused). Which fields are files is asked of each encoder (`read` resolves them through the
data root), never decided by a modality's name.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmfuse.data.records import DataError, Record
from mmfuse.encoders.base import DataRoot, InputError
from mmfuse.predict import Predictor


class RequestError(Exception):
    """A bad request: `status` (4xx) and a one-line `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    """What one request may hold (all configurable on the command line).

    Attributes:
        max_body_bytes: the request body (JSON or multipart), uploads included.
        max_records: records in one request.
        max_pixels: pixels of one uploaded image (checked from its header, before it is decoded).
    """

    max_body_bytes: int = 16 * 2**20
    max_records: int = 64
    max_pixels: int = 25_000_000


@dataclass(frozen=True)
class _ProbeRoot(DataRoot):
    """A data root that notes which values an encoder resolves as file paths."""

    resolved: list[str] = field(default_factory=list)

    def resolve(self, value: str, what: str = "file") -> str:
        self.resolved.append(value)
        return os.path.join(str(self.path), value)


def file_fields(predictor: Predictor) -> set[str]:
    """The record fields that the run's encoders read as file paths."""
    return set(upload_suffixes(predictor))


def upload_suffixes(predictor: Predictor) -> dict[str, str]:
    """{record field that its encoder reads as a file path: the name ending an upload for it needs}.

    A field counts when the encoder resolves the probe value through the data root, even if it then refuses
    the name (an embedding takes only `.npy` names): the suffix is the first of `Encoder.file_suffixes`.
    """
    out = {}
    for modality, keys in predictor.input_fields.items():
        encoder, field_name = predictor.model.encoders[modality], predictor.schema.field_of(modality)
        for key in keys:
            probe = _ProbeRoot(Path("/nonexistent"))
            with contextlib.suppress(InputError, TypeError, ValueError):
                encoder.read({key: "probe"}, field_name, probe)
            if probe.resolved:
                out[key] = encoder.file_suffixes[0] if encoder.file_suffixes else ""
    return out


class Uploads:
    """The files of one request in the upload folder; `close` removes them."""

    def __init__(self, folder: Path) -> None:
        self.root = DataRoot(folder)
        self.names: dict[str, str] = {}  # file name -> the field it came from
        self.closed = False

    def add(self, data: bytes, key: str, suffix: str = "") -> str:
        if self.closed:
            raise RequestError(499, "the request was abandoned")
        name = uuid.uuid4().hex + suffix
        (self.root.path / name).write_bytes(data)
        self.names[name] = key
        return name

    def scrub(self, message: str) -> str:
        """A message without the server's upload paths: each becomes "upload:FIELD"."""
        for name, key in self.names.items():
            full = str(self.root.path / name)
            message = message.replace(f" at {full}", "").replace(full, f"upload:{key}").replace(name, f"upload:{key}")
        return message.replace(str(self.root.path), "<uploads>")

    def close(self) -> None:
        self.closed = True
        for name in self.names:
            (self.root.path / name).unlink(missing_ok=True)
        self.names.clear()


def parse_json(body: bytes) -> tuple[list[Any], bool]:
    """(rows, whether the body held one object rather than a list)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise RequestError(400, f"the body is not valid JSON ({str(err)[:120]})") from None
    if isinstance(value, dict):
        return [value], True
    if isinstance(value, list):
        return value, False
    raise RequestError(400, f"expected a JSON object (one record) or a list of objects, got {type(value).__name__}")


def decode_upload(value: Any, key: str) -> bytes:
    """A file field's value (bytes, or base64 / a base64 `data:` URL in a string) -> the file's bytes."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("data:"):
            head, sep, text = text.partition(",")
            if not sep or not head.endswith(";base64"):
                raise RequestError(422, f"field {key!r}: a data URL must be base64 (data:<type>;base64,<bytes>)")
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(
                422,
                f"field {key!r} takes the file's bytes, base64-encoded (or a multipart upload); "
                "this value is not base64 (the server never opens a path)",
            ) from None
    else:
        raise RequestError(422, f"field {key!r} takes a file, base64-encoded in a string; got {type(value).__name__}")
    if not data:
        raise RequestError(422, f"field {key!r}: the uploaded file is empty")
    return data


def check_pixels(data: bytes, key: str, limit: int) -> None:
    """Refuse an image whose header announces more than `limit` pixels (it would be decoded in full)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception:  # not an image Pillow knows, or broken: the encoder's check says what is wrong
        return
    if width * height > limit:
        raise RequestError(413, f"field {key!r}: a {width}x{height} image is over the limit of {limit:,} pixels")


class RecordReader:
    """Turns the rows of one request into checked records of the run.

    Args:
        predictor: the loaded run (its schema and checks are used).
        limits: request limits.
        allow_missing: accept records that lack an input the model was trained with.
    """

    def __init__(self, predictor: Predictor, limits: Limits, allow_missing: bool = False) -> None:
        self.predictor, self.limits, self.allow_missing = predictor, limits, allow_missing
        self.known = {k for keys in predictor.input_fields.values() for k in keys}
        self.suffixes = upload_suffixes(predictor)
        self.files = set(self.suffixes)

    def check_count(self, rows: Sequence[Any]) -> None:
        """RequestError for a request with no record or more than `limits.max_records`."""
        if not rows:
            raise RequestError(422, "the request holds no record")
        if len(rows) > self.limits.max_records:
            raise RequestError(413, f"{len(rows)} records in one request; the limit is {self.limits.max_records}")

    def records(self, rows: Sequence[Any], uploads: Uploads) -> list[Record]:
        """Checked records (uploads written to `uploads`); RequestError for the first bad row."""
        self.check_count(rows)
        names = ["record"] if len(rows) == 1 else [f"record {i}" for i in range(len(rows))]
        records = [self._record(row, where, uploads) for row, where in zip(rows, names)]
        try:
            good, _ = self.predictor.check(records, allow_missing=self.allow_missing)
        except DataError as err:
            message = str(err).replace("pass --allow-missing", "start the server with --allow-missing")
            raise RequestError(422, uploads.scrub(message)) from None
        return good

    def _record(self, row: Any, where: str, uploads: Uploads) -> Record:
        if not isinstance(row, Mapping):
            raise RequestError(422, f"{where}: expected an object of input fields, got {type(row).__name__}")
        unknown = [k for k in row if k not in self.known]
        if unknown:
            raise RequestError(
                422,
                f"{where}: this run does not read {', '.join(map(repr, unknown))}; "
                f"its inputs: {self.predictor.describe_inputs()}",
            )
        values = dict(row)
        for key, value in values.items():
            if key in self.files and value is not None and value != "" and not self._plain(key, value, uploads):
                data = decode_upload(value, key)
                check_pixels(data, key, self.limits.max_pixels)
                values[key] = uploads.add(data, key, self.suffixes[key])
            elif isinstance(value, bytes):
                raise RequestError(422, f"{where}: field {key!r} is not a file input; send it as a plain value")
        try:
            return self.predictor.schema.record(values, where, uploads.root, required=False)
        except DataError as err:
            raise RequestError(422, uploads.scrub(str(err))) from None

    def _plain(self, key: str, value: Any, uploads: Uploads) -> bool:
        """Whether a file field's value is one its encoder takes as it is, as in a records file (an embedding's
        list of numbers); strings and bytes are always file contents here, never paths."""
        if isinstance(value, (str, bytes)):
            return False
        modality = next(m for m, keys in self.predictor.input_fields.items() if key in keys)
        encoder, field_name = self.predictor.model.encoders[modality], self.predictor.schema.field_of(modality)
        try:
            encoder.read({key: value}, field_name, uploads.root)
        except (InputError, TypeError, ValueError):
            return False
        return True
