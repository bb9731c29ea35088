"""Records: one sample as read from a JSONL/JSON or CSV file, before any decoding.

A record holds an absolute image path, a text and the raw label of each task (None where the
label is missing or empty: missing labels are not errors, they are masked in the loss later).
Every problem in a file is a one-line `DataError` "FILE:ROW: what is wrong", where ROW is the
1-based line number (for CSV the header is line 1, so the first data row is line 2).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val", "test": "test"}
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


class DataError(ValueError):
    """A problem in the data, with a one-line message "FILE:ROW: what is wrong"."""


@dataclass
class Record:
    """One sample.

    Attributes:
        image: absolute image path, or None when the sample has no image.
        text: the text, or None when the sample has no text.
        labels: {task: raw label or None (missing)}.
        source: "FILE:ROW" where the record came from, used in every error about it.
        split: "train", "val" or "test" when known.
    """

    image: str | None
    text: str | None
    labels: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    split: str | None = None


def _label_map(label_fields: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """{task: record field}; a plain list names tasks that read the field of the same name."""
    if isinstance(label_fields, Mapping):
        return dict(label_fields)
    return {name: name for name in label_fields}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _clean_label(value: Any) -> Any:
    if _missing(value):
        return None
    return value.strip() if isinstance(value, str) else value


def _string_field(row: Mapping[str, Any], name: str, where: str, required: bool = True) -> str | None:
    """A modality field's value: null/empty is None (missing modality); an absent key is an error if required."""
    if name not in row and not required:
        return None
    if name not in row:
        raise DataError(f"{where}: record has no {name!r} field (fields: {', '.join(map(str, row)) or 'none'})")
    value = row[name]
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r:.40}")
    return value


def _make_record(
    row: Mapping[str, Any],
    where: str,
    labels: Mapping[str, str],
    image_root: Path,
    image_field: str | None,
    text_field: str | None,
    split_field: str | None,
    required: Collection[str],
) -> Record:
    image = _string_field(row, image_field, where, "image" in required) if image_field else None
    if image is not None:
        image = os.path.abspath(os.path.join(image_root, os.path.expanduser(image.strip())))
    text = _string_field(row, text_field, where, "text" in required) if text_field else None
    split = row.get(split_field) if split_field else None
    split = None if _missing(split) else str(split).strip().lower()
    raw = {task: _clean_label(row.get(name)) for task, name in labels.items()}
    return Record(image=image, text=text, labels=raw, source=where, split=split)


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, parsed value) for a JSON-lines file, or for a JSON array (rows = items)."""
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path.suffix == ".json" and content.lstrip().startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: bad JSON: {err.msg} (column {err.colno})") from None
        yield from enumerate(items, start=1)
        return
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:  # a bad line is that row's error (skippable), not the file's
            yield number, DataError(f"{path}:{number}: bad JSON: {err.msg} (column {err.colno})")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number of the row's first line, {column: cell}) for a CSV file with a header."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            start = reader.line_num + 1
            for cells in reader:
                if cells:
                    if len(cells) != len(header):
                        yield (
                            start,
                            DataError(f"{path}:{start}: row has {len(cells)} cells but the header has {len(header)}"),
                        )
                    else:
                        yield start, dict(zip(header, cells))
                start = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: bad CSV: {err}") from None


def read_records(
    path: str | os.PathLike[str],
    *,
    label_fields: Sequence[str] | Mapping[str, str],
    image_root: str | os.PathLike[str] | None = None,
    image_field: str | None = "image",
    text_field: str | None = "text",
    split_field: str | None = "split",
    required: Collection[str] = ("image", "text"),
    errors: list[tuple[str, str]] | None = None,
) -> list[Record]:
    """Read records from a `.jsonl`/`.json` (one object per line, or a JSON array) or `.csv` file.

    Args:
        path: the records file.
        label_fields: task names whose labels sit in fields of the same name, or {task: field}.
        image_root: folder that relative image paths are joined to; default: the file's folder.
        image_field: field holding the image path (required in every record); None: no images.
        text_field: field holding the text (required in every record); None: no text.
        split_field: optional field naming each record's split (train/val/validation/test).
        required: the modalities ("image", "text") whose field every record must have; a record may
            omit the others (None). Prediction inputs pass `()`.
        errors: when given, a bad row (bad JSON, missing field, non-string text) is appended here as
            (FILE:ROW, reason) and skipped instead of raising.

    Raises:
        DataError: "FILE:ROW: ..." for a missing file, an unknown extension, bad JSON, a record that
            is not an object or lacks a required image or text field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: records file not found (looked in {path.resolve().parent})")
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES:
        rows: Iterator[tuple[int, Any]] = _json_rows(path)
    elif suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise DataError(f"{path}: unknown records format {path.suffix!r} (use .jsonl, .json or .csv)")
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    labels = _label_map(label_fields)
    records = []
    for number, row in rows:
        where = f"{path}:{number}"
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
            records.append(_make_record(row, where, labels, root, image_field, text_field, split_field, required))
        except DataError as err:
            if errors is None:
                raise
            errors.append((where, str(err).removeprefix(f"{where}: ")))
    logger.debug("read %d records from %s", len(records), path)
    return records


def split_records(
    records: Sequence[Record],
    val_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 0,
    group_by: str | None = None,
) -> dict[str, list[Record]]:
    """Randomly split records into train/val/test, the same way for the same seed.

    Args:
        records: the records to split; each keeps its file order inside its split.
        val_fraction: share of records (or groups) for "val".
        test_fraction: share of records (or groups) for "test".
        seed: seed of the shuffle.
        group_by: a Record attribute (e.g. "image") whose records stay together in one split.

    Returns:
        {"train": [...], "val": [...], "test": [...]}, records copied with `split` set.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be >= 0, sum < 1")
    keys = [getattr(r, group_by) if group_by else i for i, r in enumerate(records)]
    groups = list(dict.fromkeys(keys)) if group_by else keys
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_val, n_test = _split_size(len(groups), val_fraction), _split_size(len(groups), test_fraction)
    assigned: dict[Any, str] = {}
    for rank, g in enumerate(order):
        assigned[groups[g]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    out: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for key, record in zip(keys, records):
        name = assigned[key]
        out[name].append(dataclasses.replace(record, split=name))
    return out


def _split_size(n: int, fraction: float) -> int:
    """round(n * fraction), but at least 1 when the fraction is positive and n > 1."""
    if fraction <= 0 or n < 2:
        return 0
    return max(1, round(n * fraction))


def _with_split(records: list[Record], name: str) -> list[Record]:
    return [dataclasses.replace(r, split=name) for r in records]


def _by_split_field(records: list[Record], split_field: str) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for r in records:
        if r.split is None:
            raise DataError(f"{r.source}: no {split_field!r} value, while other records of the file have one")
        if r.split not in _SPLIT_ALIASES:
            raise DataError(f"{r.source}: unknown {split_field!r} value {r.split!r} (use train, val or test)")
        name = _SPLIT_ALIASES[r.split]
        out[name].append(dataclasses.replace(r, split=name))
    return out


def load_record_splits(
    *,
    train: str | os.PathLike[str] | None = None,
    val: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    label_fields: Sequence[str] | Mapping[str, str],
    image_root: str | os.PathLike[str] | None = None,
    image_field: str | None = "image",
    text_field: str | None = "text",
    split_field: str | None = "split",
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    errors: list[tuple[str, str]] | None = None,
) -> dict[str, list[Record]]:
    """Load train/val/test records from one file per split, or from one file.

    With separate files, a split without a file is carved out of train by its fraction (seeded).
    With one `path`, records that carry a split field are grouped by it (train/val/validation/test;
    if no record is marked val, val is carved out of train); without a split field the records are
    split at random by `val_fraction`/`test_fraction` and `seed`.

    Returns:
        {"train": [...], "val": [...], "test": [...]} (val/test may be empty).
    """
    read = dict(
        label_fields=label_fields,
        image_root=image_root,
        image_field=image_field,
        text_field=text_field,
        split_field=split_field,
        errors=errors,
    )
    if path is not None and any(p is not None for p in (train, val, test)):
        raise ValueError("give either one records `path` or separate train/val/test files, not both")
    if path is not None:
        records = read_records(path, **read)
        if not records:
            raise DataError(f"{path}: no records")
        if split_field and any(r.split is not None for r in records):
            splits = _by_split_field(records, split_field)
            if not splits["val"] and val_fraction > 0:
                logger.info("%s: no record is marked val; holding out %.0f%% of train", path, 100 * val_fraction)
                carved = split_records(splits["train"], val_fraction, 0.0, seed)
                splits["train"], splits["val"] = carved["train"], carved["val"]
            if not splits["train"]:
                raise DataError(f"{path}: no record is marked train")
            return splits
        return split_records(records, val_fraction, test_fraction, seed)
    if train is None:
        raise ValueError("give a records `path` or at least a `train` file")
    splits = {"train": _with_split(read_records(train, **read), "train")}
    if not splits["train"]:
        raise DataError(f"{train}: no records")
    carve_val = val_fraction if val is None else 0.0
    carve_test = test_fraction if test is None else 0.0
    if carve_val or carve_test:
        splits.update(split_records(splits["train"], carve_val, carve_test, seed))
    for name, file in (("val", val), ("test", test)):
        if file is not None:
            splits[name] = _with_split(read_records(file, **read), name)
        splits.setdefault(name, [])
    return splits


def _label_names(value: Any, multilabel: bool) -> list[str]:
    if isinstance(value, (list, tuple, set)):
        return [str(v).strip() for v in value]
    text = str(value).strip()
    return [s.strip() for s in text.split("|") if s.strip()] if multilabel else [text]


def infer_classes(records: Sequence[Record], task: str, multilabel: bool = False) -> list[str]:
    """Sorted distinct non-missing label strings of `task` (lists and, if multilabel, "a|b" split)."""
    names: set[str] = set()
    for r in records:
        value = r.labels.get(task)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        names.update(_label_names(value, multilabel))
    return sorted(names)
