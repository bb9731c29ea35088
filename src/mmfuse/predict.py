"""Predictions from a finished run directory, without the trainer: per task, what its kind describes
(a class and probabilities, a set of labels, a value).

Inputs come as records (a JSONL/CSV file, or a split of a shard set written by `mmfuse pack`, streamed a chunk of
records at a time) or as field values (the command line); each modality's encoder reads its own field(s), exactly as
in training. A record is refused (one line, skippable) when it has
none of the run's inputs, and when it lacks one while the model was never trained without it, unless
`allow_missing` is set (then a warning is logged).

Two engines share `RunInputs` (reading and checking records, torch-free): `Predictor` runs the run's PyTorch model,
`mmfuse.export.runtime.OnnxPredictor` its ONNX export without importing torch. This module imports torch only
when a `Predictor` is built, so the ONNX engine can use `RunInputs` in a process that never imports torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmfuse.data.records import DataError, Record, read_rows, records_from_rows
from mmfuse.raw_inputs import DataRoot

if TYPE_CHECKING:
    from mmfuse.data.shards import ShardSplit

log = logging.getLogger(__name__)


class RunInputs:
    """Reading records against a run's inputs and refusing the bad ones (one line each): what both engines share.

    Subclasses set `schema` (rows -> records: `row_keys(modality)`, `record(row, where, root, required)`),
    `modalities`, `trained_for_missing` and `_other_fields`, and implement `_check_inputs`.
    """

    schema: Any
    modalities: list[str]
    trained_for_missing: bool
    _other_fields: set[str]

    @property
    def input_fields(self) -> dict[str, list[str]]:
        """{modality: the record fields its encoder reads}."""
        return {m: self.schema.row_keys(m) for m in self.modalities}

    def describe_inputs(self) -> str:
        return ", ".join(f"{m} (field {' or '.join(map(repr, keys))})" for m, keys in self.input_fields.items())

    # ------------------------------------------------------------------ reading inputs
    def records_from_file(
        self,
        path: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        allow_outside_root: bool = False,
        errors: list[tuple[str, str]] | None = None,
    ) -> list[Record]:
        """Records of a JSONL/JSON/CSV file; file paths in it are confined to `root` (default: its folder)."""
        before = len(errors) if errors is not None else 0
        header, rows = read_rows(path)
        data_root = DataRoot(Path(root).expanduser() if root is not None else Path(path).parent, allow_outside_root)
        found = records_from_rows(
            rows, str(path), self.schema, data_root, required=False, header=header, errors=errors,
            row_check=self.misspelt_field,
        )  # fmt: skip
        if not found and (errors is None or len(errors) == before):
            raise DataError(f"{path}: no records to predict (the file is empty or holds only blank lines)")
        return found

    def misspelt_field(self, row: Mapping[str, Any]) -> str | None:
        """Why a row is refused: it lacks an input field and carries an unknown field a typo away from it.

        Fields that are neither inputs, task label fields nor the split/group fields are otherwise accepted
        (ids, metadata); only a near miss of a field the row lacks (`txet` for `text`) is refused, naming both.
        """
        expected = [k for keys in self.input_fields.values() for k in keys]
        known = set(expected) | self._other_fields
        for key in expected:
            if key in row:
                continue
            for other in row:
                if isinstance(other, str) and other not in known and _near(other, key):
                    return f"field {other!r} is not an input of this run; did you mean {key!r}?"
        return None

    def records_from_fields(self, fields: Mapping[str, Any], source: str = "command line") -> list[Record]:
        """One record from field values given directly (paths relative to the current folder, not confined).

        Raises:
            DataError: for a field that none of the run's encoders reads.
        """
        known = {k for keys in self.input_fields.values() for k in keys}
        unused = [f for f in fields if f not in known]
        if unused:
            raise DataError(
                f"{source}: this run does not read {', '.join(map(repr, unused))}; its inputs: {self.describe_inputs()}"
            )
        root = DataRoot(Path.cwd(), allow_outside=True)
        return [self.schema.record(dict(fields), source, root, required=False)]

    # ------------------------------------------------------------------ checking
    def check(
        self, records: Sequence[Record], allow_missing: bool = False, skip_bad: bool = False
    ) -> tuple[list[Record], list[tuple[str, str]]]:
        """Refuse records with none of the run's inputs, or lacking one the model cannot do without.

        Returns:
            (good records, [(source, reason)] of the skipped ones when `skip_bad`).

        Raises:
            DataError: "SOURCE: reason" for the first bad record, unless `skip_bad`.
        """
        good, bad, lacking = [], [], 0
        for record in records:
            problem = self._problem(record, allow_missing)
            if problem is None:
                good.append(record)
                lacking += any(v is None for v in record.inputs.values())
            elif skip_bad:
                bad.append((record.source, problem))
            else:
                raise DataError(f"{record.source}: {problem}")
        if lacking and not self.trained_for_missing:
            log.warning(
                "%d record(s) lack an input, and the model was trained with every input present: "
                "their predictions may be poor (train with train.balance: {name: modality_dropout} to fix that)",
                lacking,
            )
        good, more = self._check_inputs(good, skip_bad)
        return good, bad + more

    def _check_inputs(self, records: list[Record], skip_bad: bool) -> tuple[list[Record], list[tuple[str, str]]]:
        """Each present input passes its encoder's check (decodes, ...): (good, [(source, reason)] when skip_bad)."""
        raise NotImplementedError

    def _problem(self, record: Record, allow_missing: bool) -> str | None:
        missing = [m for m in self.modalities if record.inputs.get(m) is None]
        if len(missing) == len(self.modalities):
            return f"none of the run's inputs is given; it reads {self.describe_inputs()}"
        if missing and not (allow_missing or self.trained_for_missing):
            names = ", ".join(f"{m} (field {' or '.join(map(repr, self.input_fields[m]))})" for m in missing)
            return (
                f"no {names}; the model was trained with every input present: give it, or pass --allow-missing "
                "to predict without it"
            )
        return None


class Predictor(RunInputs):
    """Loads a run once; predicts for records that carry some or all of its inputs, with its PyTorch model.

    Args:
        run_dir: a finished run directory.
        device: "cpu", "cuda", ...; default: CUDA when available.

    Example:
        >>> p = Predictor("runs/easy_vqa")
        >>> records = p.records_from_fields({"image": "shape.png", "text": "what color is the shape?"})
        >>> p.predict(records)
        [{"answer": {"label": "blue", "probabilities": {...}}, ...}]
    """

    def __init__(self, run_dir: str | Path, device: str | None = None) -> None:
        import torch

        from mmfuse.builders import build_schema, trained_for_missing_inputs
        from mmfuse.runs import open_run

        run = open_run(run_dir)
        self.model, self.config = run.model, run.config
        self.modalities = list(self.model.encoders)
        self.schema = build_schema(self.config, self.model.encoders)
        labels = set(self.schema.labels.values())  # each task's label field
        self._other_fields = labels | {self.schema.split_field, self.schema.group_by} - {None}
        self.schema.labels, self.schema.split_field, self.schema.group_by = {}, None, None
        self.trained_for_missing = trained_for_missing_inputs(self.config)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)

    def shard_split(self, folder: str | os.PathLike[str], split: str = "test") -> ShardSplit:
        """One split of a shard set (`mmfuse pack`), checked before any record is read.

        Raises:
            ShardError: one line: not a shard set, no such split, packed for other inputs than this run reads, or a
                missing, truncated or altered shard of the split (size and sha256 against the manifest).
        """
        from mmfuse.data.shards import MANIFEST, ShardError, read_manifest, split_of, verify_shards
        from mmfuse.pack import describe

        manifest = read_manifest(folder)
        if split not in manifest["splits"]:
            held = ", ".join(manifest["splits"]) or "none"
            raise ShardError(f"{folder}: the shard set has no {split!r} split (splits: {held})")
        ours, theirs = describe(self.config.model_dump(mode="json"), self.model.encoders)["inputs"], manifest["inputs"]
        for m, value in ours.items():  # labels play no part in a prediction: only the inputs must be the run's
            if theirs.get(m) != value:
                raise ShardError(
                    f"{Path(folder) / MANIFEST}: packed for another config: model.encoders.{m} is {value} here, "
                    f"{theirs.get(m, 'absent')} there; pack the data again with it"
                )
        verify_shards(folder, {"splits": {split: manifest["splits"][split]}})
        return split_of(folder, split, manifest["splits"][split])

    def shard_records(self, split: ShardSplit, chunk: int = 1024) -> Iterator[list[Record]]:
        """The split's records in their order, `chunk` at a time (LitData streams the chunk files: bounded memory).
        An input file embedded in the shards is written once, by its content, for its encoder to read."""
        from litdata import StreamingDataset

        from mmfuse.data.shards import files_folder, item_record, local_copy

        records: list[Record] = []
        for item in StreamingDataset(split.path, shuffle=False):
            record, files = item_record(item, split.split)
            for m, data in files.items():
                record.inputs[m] = local_copy(data, str(record.inputs[m]), files_folder())
            records.append(record)
            if len(records) == chunk:
                yield records
                records = []
        if records:
            yield records

    # ------------------------------------------------------------------ checking
    def _check_inputs(self, records: list[Record], skip_bad: bool) -> tuple[list[Record], list[tuple[str, str]]]:
        from mmfuse.data.dataset import validate_records

        return validate_records(records, {}, dict(self.model.encoders), skip_bad, allow_missing=True)

    # ------------------------------------------------------------------ predicting
    def batches(self, records: Sequence[Record], batch_size: int) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        from mmfuse.data.collate import Collator
        from mmfuse.data.dataset import MultiModalDataset

        encoders = dict(self.model.encoders)
        dataset = MultiModalDataset(records, {}, encoders, train=False)
        yield from DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(encoders, {}))

    def predict(self, records: Sequence[Record], batch_size: int = 64) -> list[dict[str, Any]]:
        """Per record, {task: the task kind's description of its prediction}. Check records first (`check`)."""
        import torch

        from mmfuse.utils import move_to

        results: list[dict[str, Any]] = []
        with torch.inference_mode():
            for batch in self.batches(records, batch_size):
                inputs = move_to(batch["inputs"], self.device)
                absent = {m: a.to(self.device) for m, a in batch.get("absent", {}).items()}
                out = self.model(inputs, absent=absent or None)
                per_task = {name: task.predict(out.logits[name]) for name, task in self.model.tasks.items()}
                for i in range(len(batch["index"])):
                    results.append({n: self.model.tasks[n].describe(p, i) for n, p in per_task.items()})
        return results

    def format(self, result: Mapping[str, Any], top: int = 3) -> list[str]:
        """Terminal lines of one record's result: "task: <the kind's short form>"."""
        return [f"{name}: {self.model.tasks[name].format(r, top)}" for name, r in result.items()]


def _near(typed: str, name: str) -> bool:
    """Whether `typed` is a likely typo of `name`: a few edits apart (a swap of two letters is one edit), case
    ignored; up to 3 letters only a swap or a changed letter, up to 5 letters one edit, longer ones two."""
    a, b = typed.lower(), name.lower()
    if a == b:
        return True
    if len(b) <= 3 and len(a) != len(b):
        return False
    return _edit_distance(a, b) <= (1 if len(b) <= 5 else 2)


def _edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and adjacent swaps."""
    if abs(len(a) - len(b)) > 2:
        return 3  # more than any threshold in `_near`
    prev2, prev = [0] * (len(b) + 1), list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[len(b)]
