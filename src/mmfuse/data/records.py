"""Records: one sample each, read from JSONL/JSON/CSV files (or a built-in set), split into train/val/test.

A `Record` holds `inputs: {modality: reference}` and `labels: {task: raw label}`. Which row fields
become which input is the business of each modality's encoder (`Encoder.read`), told by a `Schema`
which field it reads; labels are kept raw (each task kind parses its own in validation).
Every problem in a file is a one-line `DataError` "FILE:ROW: what is wrong", where ROW is the
1-based line number (for CSV the header is line 1, so the first data row is line 2).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmfuse.files import check_regular, open_regular
from mmfuse.text import is_blank, one_line

if TYPE_CHECKING:
    from mmfuse.encoders.base import Encoder

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val", "test": "test"}
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
RowCheck = Callable[[Mapping[str, Any]], "str | None"]  # a parsed row -> None, or why it is refused


class DataError(ValueError):
    """A problem in the data, with a one-line message "FILE:ROW: what is wrong"."""


@dataclass
class Record:
    """One sample.

    Attributes:
        inputs: {modality: the input's reference (as its encoder's `read` returns it), or None when missing}.
        labels: {task: raw label, or None when missing (masked in the loss, never an error)}.
        source: "FILE:ROW" where the record came from, used in every error about it.
        split: "train", "val" or "test" when known.
        group: the value of the `data.group_by` field, when it names a field rather than a modality.
    """

    inputs: dict[str, Any]
    labels: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    split: str | None = None
    group: Hashable | None = None


def keep_good(
    records: Sequence[Record], problem_of: Callable[[Record], str | None], skip_bad: bool
) -> tuple[list[Record], list[tuple[str, str]]]:
    """(records without a problem, [(source, problem), ...] of the others); DataError "SOURCE: problem" for the first
    record with a problem unless `skip_bad`."""
    good, bad = [], []
    for record in records:
        problem = problem_of(record)
        if problem is None:
            good.append(record)
        elif skip_bad:
            bad.append((record.source, problem))
        else:
            raise DataError(f"{record.source}: {problem}")
    return good, bad


@dataclass
class Schema:
    """How rows become records: each modality's encoder and field, each task's label field.

    Args:
        encoders: {modality: encoder}; only the data side (`fields`, `read`) is used here.
        fields: {modality: the record field its encoder reads}; default: the modality's name.
        labels: {task: record field holding its label}.
        split_field: optional field naming each record's split (train/val/validation/test).
        group_by: a field whose records stay in one split (a modality's name is handled by `group_key`).
    """

    encoders: Mapping[str, Encoder]
    fields: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    split_field: str | None = "split"
    group_by: str | None = None

    def field_of(self, modality: str) -> str:
        return self.fields.get(modality, modality)

    def row_keys(self, modality: str) -> list[str]:
        """The row keys the modality's encoder reads."""
        return self.encoders[modality].fields(self.field_of(modality))

    def record(self, row: Mapping[str, Any], where: str, root: Any, required: bool) -> Record:
        """One parsed row -> Record; DataError "WHERE: ..." for a missing required field or a bad value."""
        from mmfuse.raw_inputs import InputError

        inputs: dict[str, Any] = {}
        for modality, encoder in self.encoders.items():
            keys = self.row_keys(modality)
            if required and not any(k in row for k in keys):
                fields = ", ".join(map(str, row)) or "none"
                raise DataError(f"{where}: record has no {' or '.join(map(repr, keys))} field (fields: {fields})")
            try:
                inputs[modality] = encoder.read(row, self.field_of(modality), root)
            except InputError as err:
                raise DataError(f"{where}: {modality}: {err}") from None
        split = _text(row.get(self.split_field)) if self.split_field else None
        group = None
        if self.group_by and self.group_by not in self.encoders:
            value = row.get(self.group_by)
            group = value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)
        labels = {task: _clean_label(row.get(name)) for task, name in self.labels.items()}
        return Record(inputs, labels, where, split.lower() if split else None, group)


def _text(value: Any) -> str | None:
    if is_blank(value):
        return None
    return str(value).strip()


def _clean_label(value: Any) -> Any:
    if is_blank(value):
        return None
    return value.strip() if isinstance(value, str) else value


# ---------------------------------------------------------------------- reading files
def _json_value(text: str, where: str) -> Any:
    """One JSON document -> value, or a DataError for bad JSON, absurd nesting or an oversized number."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return DataError(f"{where}: bad JSON: {err.msg} (column {err.colno})")
    except RecursionError:
        return DataError(f"{where}: JSON nested too deeply")
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        return DataError(f"{where}: bad JSON: {one_line(err, 120)}")


def _read_text(path: Path) -> str:
    """The file as text; a byte that is not UTF-8 stays in it as a lone surrogate (`_utf8_problem` finds it)."""
    with open_regular(path, "records file") as f:
        data = f.read()
    return data.decode("utf-8-sig", errors="surrogateescape")  # a UTF-8 byte-order mark is accepted and dropped


def _utf8_problem(text: str) -> str | None:
    """None when `text` (decoded with surrogateescape) was valid UTF-8, else what the first bad byte is."""
    if not any("\udc80" <= ch <= "\udcff" for ch in text):
        return None
    try:
        text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError as err:
        return f"not UTF-8 text ({getattr(err, 'reason', err)} at byte {getattr(err, 'start', 0)} of the row)"
    return None


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, parsed value or DataError) for a JSON-lines file, or for a JSON array (rows = items).

    A line with a byte that is not UTF-8 is that row's error (skippable); in a JSON array it is the file's.
    """
    content = _read_text(path)
    if path.suffix.lower() == ".json" and content.lstrip().startswith("["):
        if problem := _utf8_problem(content):
            raise DataError(f"{path}: {problem.replace(' of the row', '')}")
        items = _json_value(content, str(path))
        if isinstance(items, DataError):
            raise items
        yield from enumerate(items, start=1)
        return
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        if problem := _utf8_problem(line):
            yield number, DataError(f"{path}:{number}: {problem}")
        else:
            yield number, _json_value(line, f"{path}:{number}")  # a bad line is that row's error (skippable)


def _csv_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, Any]]]:
    """(header, iterator of (line number of the row's first line, {column: cell} or DataError))."""
    handle = io.TextIOWrapper(open_regular(path, "records file"), "utf-8-sig", "surrogateescape", newline="")
    reader = csv.reader(handle)
    try:
        header = [h.strip() for h in next(reader, None) or []]
    except csv.Error as err:
        handle.close()
        raise DataError(f"{path}:1: bad CSV header: {err}") from None
    if problem := _utf8_problem("".join(header)):
        handle.close()
        raise DataError(f"{path}:1: header: {problem.replace(' of the row', '')}")

    def rows() -> Iterator[tuple[int, Any]]:
        start = reader.line_num + 1
        try:
            for cells in reader:
                if cells and (problem := _utf8_problem("".join(cells))):
                    yield start, DataError(f"{path}:{start}: {problem}")
                elif cells and len(cells) != len(header):
                    yield (
                        start,
                        DataError(f"{path}:{start}: row has {len(cells)} cells but the header has {len(header)}"),
                    )
                elif cells:
                    yield start, dict(zip(header, cells))
                start = reader.line_num + 1
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: bad CSV: {err}") from None
        finally:
            handle.close()

    return header, rows()


def read_rows(path: str | os.PathLike[str]) -> tuple[list[str] | None, Iterator[tuple[int, Any]]]:
    """(CSV header or None, (row number, parsed row or DataError)) for a .jsonl/.json/.ndjson/.csv file."""
    path = Path(path)
    try:
        check_regular(path, "records file")
    except FileNotFoundError:
        raise DataError(f"{path}: records file not found (looked in {path.resolve().parent})") from None
    except OSError as err:
        raise DataError(str(err).replace(f"records file {path} is", f"{path}: records file is")) from None
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES:
        return None, _json_rows(path)
    if suffix == ".csv":
        return _csv_rows(path)
    raise DataError(f"{path}: unknown records format {path.suffix!r} (use .jsonl, .json or .csv)")


def records_from_rows(
    rows: Iterator[tuple[int, Any]] | Sequence[tuple[int, Any]],
    name: str,
    schema: Schema,
    root: Any,
    *,
    required: bool = True,
    header: Sequence[str] | None = None,
    errors: list[tuple[str, str]] | None = None,
    row_check: RowCheck | None = None,
) -> list[Record]:
    """Parsed rows of one source -> records, with the file-level checks of `read_records` (first)."""
    rows = list(rows)
    if required and rows:  # (an empty file gets its own error from the caller)
        seen = set(header or ())
        for _, row in rows:
            if isinstance(row, dict):
                seen.update(row)
        _check_fields(name, schema, seen, header is not None)
    records = []
    for number, row in rows:
        where = f"{name}:{number}"
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
            if row_check is not None and (problem := row_check(row)):
                raise DataError(f"{where}: {problem}")
            records.append(schema.record(row, where, root, required))
        except DataError as err:
            if errors is None:
                raise
            errors.append((where, str(err).removeprefix(f"{where}: ")))
    return records


def _check_fields(name: str, schema: Schema, seen: set[str], is_csv: bool) -> None:
    """A file that lacks a modality's field or a task's label field entirely is an error, not a silent drop."""
    what = "column" if is_csv else "field"
    shown = ", ".join(sorted(map(str, seen))) or "none"
    for modality in schema.encoders:
        keys = schema.row_keys(modality)
        if not any(k in seen for k in keys):
            raise DataError(
                f"{name}: no {what} {' or '.join(map(repr, keys))} for the {modality!r} input ({what}s: {shown}); "
                f"set model.encoders.{modality}.field, or remove that encoder"
            )
    group = schema.group_by
    if group and group not in schema.encoders and group not in seen:
        raise DataError(
            f"{name}: no {what} {group!r} to group records by (data.group_by: a modality of the model, "
            f"{', '.join(schema.encoders)}, or a {what}: {shown})"
        )
    for task, key in schema.labels.items():
        if key not in seen:
            raise DataError(
                f"{name}: no {what} {key!r} for the labels of task {task!r} ({what}s: {shown}); add it (empty cells "
                f"are missing labels, masked) or set tasks.{task}.field"
            )


def read_records(
    path: str | os.PathLike[str],
    schema: Schema,
    *,
    root: str | os.PathLike[str] | None = None,
    allow_outside_root: bool = False,
    required: bool = True,
    errors: list[tuple[str, str]] | None = None,
    row_check: RowCheck | None = None,
) -> list[Record]:
    """Read records from a `.jsonl`/`.json` (one object per line, or a JSON array) or `.csv` file.

    Args:
        path: the records file.
        schema: each modality's encoder and field, each task's label field.
        root: folder that file references are resolved against and confined to; default: the file's folder.
        allow_outside_root: accept file references outside `root` (absolute paths, `~`, `..`).
        required: training/evaluation data: every record must have every modality's field (null is a missing
            input), and the file must have every task's label field. Prediction inputs pass False.
        errors: when given, a bad row (bad JSON, missing field, bad value) is appended here as
            (FILE:ROW, reason) and skipped instead of raising.
        row_check: called with each parsed row; a reason it returns is that row's error (skippable).

    Raises:
        DataError: "FILE:ROW: ..." for a missing file, an unknown extension, bad JSON, a record that is
            not an object or lacks a required field; "FILE: ..." for a field no record has.
    """
    from mmfuse.raw_inputs import DataRoot

    path = Path(path)
    header, rows = read_rows(path)
    data_root = DataRoot(Path(root).expanduser() if root is not None else path.parent, allow_outside_root)
    records = records_from_rows(
        rows, str(path), schema, data_root, required=required, header=header, errors=errors, row_check=row_check
    )
    logger.debug("read %d records from %s", len(records), path)
    return records


# ---------------------------------------------------------------------- splits
def group_key(record: Record, group_by: str | None) -> Hashable:
    """The key whose records share a split: a modality's reference, the group field's value, or the record."""
    if group_by is None:
        return id(record)
    if group_by in record.inputs:
        value = record.inputs[group_by]
    else:
        value = record.group
    return id(record) if value is None else (group_by, value)


def default_group_by(records: Sequence[Record], encoders: Mapping[str, Encoder]) -> str | None:
    """The first modality whose encoder `groups_records` (files) and whose references repeat, else None."""
    for modality, encoder in encoders.items():
        if not encoder.groups_records:
            continue
        refs = [r.inputs.get(modality) for r in records if r.inputs.get(modality) is not None]
        if len(set(refs)) < len(refs):
            return modality
    return None


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
        val_fraction: share of groups (records, when not grouped) for "val".
        test_fraction: share of groups for "test".
        seed: seed of the shuffle.
        group_by: a modality (records with the same reference) or a field (`Record.group`) whose records stay
            together in one split; None: every record is its own group.

    Returns:
        {"train": [...], "val": [...], "test": [...]}, records copied with `split` set.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be >= 0, sum < 1")
    keys = [group_key(r, group_by) for r in records]
    groups = list(dict.fromkeys(keys))
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


def carve_splits(
    splits: dict[str, list[Record]],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    group_by: str | None,
) -> dict[str, list[Record]]:
    """Carve the empty val/test splits (by their fractions) out of train, groups kept whole."""
    carve_val = val_fraction if not splits.get("val") else 0.0
    carve_test = test_fraction if not splits.get("test") else 0.0
    if not (carve_val or carve_test):
        return splits
    carved = split_records(splits["train"], carve_val, carve_test, seed, group_by)
    out = dict(splits)
    out["train"] = carved["train"]
    if carve_val:
        out["val"] = carved["val"]
    if carve_test:
        out["test"] = carved["test"]
    return out


def load_record_splits(
    schema: Schema,
    *,
    train: str | os.PathLike[str] | None = None,
    val: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    allow_outside_root: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    errors: list[tuple[str, str]] | None = None,
) -> dict[str, list[Record]]:
    """Load train/val/test records from one file per split, or from one file.

    With separate files, a split without a file is carved out of train by its fraction (seeded, groups kept
    whole). With one `path`, records that carry a split field are grouped by it (train/val/validation/test;
    if no record is marked val, val is carved out of train); without a split field the records are split at
    random by `val_fraction`/`test_fraction` and `seed`. Groups (`schema.group_by`, default: the repeated
    file input, see `default_group_by`) never straddle two random splits.

    Returns:
        {"train": [...], "val": [...], "test": [...]} (val/test may be empty).
    """
    read = dict(root=root, allow_outside_root=allow_outside_root, errors=errors)
    if path is not None and any(p is not None for p in (train, val, test)):
        raise ValueError("give either one records `path` or separate train/val/test files, not both")
    if path is not None:
        records = read_records(path, schema, **read)
        if not records:
            raise DataError(f"{path}: no records")
        group_by = schema.group_by or default_group_by(records, schema.encoders)
        if schema.split_field and any(r.split is not None for r in records):
            splits = _by_split_field(records, schema.split_field)
            if not splits["train"]:
                raise DataError(f"{path}: no record is marked train")
            if not splits["val"] and val_fraction > 0:
                logger.info("%s: no record is marked val; holding out %.0f%% of train", path, 100 * val_fraction)
                splits = carve_splits(splits, val_fraction, 0.0, seed, group_by)
            return splits
        return split_records(records, val_fraction, test_fraction, seed, group_by)
    if train is None:
        raise ValueError("give a records `path` or at least a `train` file")
    splits = {"train": _with_split(read_records(train, schema, **read), "train")}
    if not splits["train"]:
        raise DataError(f"{train}: no records")
    for name, file in (("val", val), ("test", test)):
        splits[name] = []
        if file is not None:
            splits[name] = _with_split(read_records(file, schema, **read), name)
            if not splits[name]:
                raise DataError(f"{file}: no records (data.{name} names an empty file)")
    group_by = schema.group_by or default_group_by(splits["train"], schema.encoders)
    return carve_splits(
        splits, val_fraction if val is None else 0.0, test_fraction if test is None else 0.0, seed, group_by
    )


def shared_inputs(splits: Mapping[str, Sequence[Record]], modalities: Sequence[str]) -> list[str]:
    """Warnings about val/test records whose input (of a file-backed modality) also occurs in training records.

    Such a split measures partly on seen inputs: model selection and test metrics come out optimistic.
    """
    notes = []
    train = splits.get("train") or []
    for modality in modalities:
        seen = {r.inputs.get(modality) for r in train} - {None}
        for split in ("val", "test"):
            records = splits.get(split) or []
            shared = [r for r in records if r.inputs.get(modality) in seen]
            if shared:
                count = Counter(r.inputs.get(modality) for r in shared)
                notes.append(
                    f"{len(shared)} of {len(records)} {split} records share their {modality!r} input with training "
                    f"records ({len(count)} distinct, e.g. {str(next(iter(count)))[:80]}): {split} metrics are "
                    "optimistic; set data.group_by or separate the files"
                )
    return notes
