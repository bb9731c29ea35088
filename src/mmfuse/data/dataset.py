"""Up-front record validation and the map-style dataset; both ask each modality's encoder, never its name.

`validate_records` finds every bad record before training starts (a missing or truncated file, an empty
text, a label its task rejects), so a run never dies at step 9,000 on one broken input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torch.utils.data import Dataset

from mmfuse.data.records import DataError, Record, keep_good
from mmfuse.encoders.base import Encoder
from mmfuse.tasks import LabelError, Task

logger = logging.getLogger(__name__)


def check_inputs(encoder: Encoder, refs: Sequence[Hashable], workers: int | None = None) -> dict[Hashable, str | None]:
    """{reference: None or the reason it is bad} for each distinct reference, checked in a small thread pool."""
    distinct = list(dict.fromkeys(refs))
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if workers <= 1 or len(distinct) < 64:
        return {r: _check(encoder, r) for r in distinct}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(distinct, pool.map(lambda r: _check(encoder, r), distinct, chunksize=32)))


def _check(encoder: Encoder, ref: Hashable) -> str | None:
    try:
        return encoder.check(ref)
    except Exception as err:  # an encoder's check must give a reason, never stop the whole validation
        return f"{type(err).__name__}: {str(err)[:160]}"


def label_problem(task: Task, raw: Any) -> str | None:
    try:
        task.encode(raw)
    except (LabelError, TypeError, ValueError, OverflowError) as err:
        return f"task {task.name!r}: {err}"
    return None


def _record_problem(
    record: Record,
    tasks: Mapping[str, Task],
    checked: Mapping[str, Mapping[Hashable, str | None]],
    allow_missing: bool,
) -> str | None:
    for modality in checked:
        ref = record.inputs.get(modality)
        if ref is None:
            if not allow_missing:
                return f"{modality} is empty or missing"
        elif (problem := checked[modality][ref]) is not None:
            return problem if problem.startswith(modality) else f"{modality}: {problem}"
    for name, task in tasks.items():
        raw = record.labels.get(name)
        if raw is not None and (problem := label_problem(task, raw)):
            return problem
    return None


def validate_records(
    records: Sequence[Record],
    tasks: Mapping[str, Task],
    encoders: Mapping[str, Encoder],
    skip_bad: bool = False,
    *,
    allow_missing: bool = False,
    workers: int | None = None,
) -> tuple[list[Record], list[tuple[str, str]]]:
    """Check every record: each input passes its encoder's `check`, each label its task's `encode`.

    Each distinct input reference is checked once (in a small thread pool).

    Args:
        records: the records to check.
        tasks: {task name: Task}; every non-missing label must be accepted by `task.encode`.
        encoders: {modality: encoder} of the inputs the model reads; only those are checked.
        skip_bad: return the bad records' reasons instead of raising on the first one.
        allow_missing: a record may lack inputs (None): prediction time, or a model trained to do without.
        workers: threads checking inputs; default min(4, CPU count).

    Returns:
        (good records, [(source, reason), ...] for the bad ones).

    Raises:
        DataError: "SOURCE: reason" for the first bad record, unless `skip_bad`.
    """
    checked = {
        m: check_inputs(enc, [r.inputs[m] for r in records if r.inputs.get(m) is not None], workers)
        for m, enc in encoders.items()
    }
    good, bad = keep_good(records, lambda r: _record_problem(r, tasks, checked, allow_missing), skip_bad)
    for name in tasks:
        if records and all(r.labels.get(name) is None for r in records):
            logger.warning("task %r has no label in any of the %d records", name, len(records))
    if bad:
        logger.warning("skipped %d of %d records (first: %s: %s)", len(bad), len(records), *bad[0])
    return good, bad


def encode_labels(record: Record, tasks: Mapping[str, Task]) -> dict[str, Any]:
    """{task: encoded label or None}; DataError "SOURCE: task 'x': ..." for a label a task rejects."""
    out = {}
    for name, task in tasks.items():
        raw = record.labels.get(name)
        if raw is None:
            out[name] = None
            continue
        try:
            out[name] = task.encode(raw)
        except (LabelError, TypeError, ValueError, OverflowError) as err:
            raise DataError(f"{record.source}: task {name!r}: {err}") from None
    return out


class MultiModalDataset(Dataset):
    """Records -> {"index": i, "inputs": {modality: preprocessed or None}, "refs": {modality: reference or None},
    "labels": {task: encoded or None}}.

    Args:
        records: the samples (validate them first with `validate_records`).
        tasks: {task name: Task}; labels are encoded once, here.
        encoders: {modality: encoder}; each input is `encoder.preprocess(encoder.load(ref), train)`. Modalities
            left out (e.g. served from the feature cache) are not loaded.
        train: passed to `preprocess` (augmentation on or off).
        share: modalities whose input a batch (`__getitems__`) loads and preprocesses once per distinct
            reference, every record of it getting the same item. Only for deterministic preprocessing: an
            augmenting encoder in training gives each record its own random view.
    """

    def __init__(
        self,
        records: Sequence[Record],
        tasks: Mapping[str, Task],
        encoders: Mapping[str, Encoder],
        train: bool = False,
        share: Collection[str] = (),
    ) -> None:
        self.records = list(records)
        self.tasks = dict(tasks)
        self.encoders = dict(encoders)
        self.train = train
        self.share = set(share)
        self.labels = [encode_labels(r, self.tasks) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._sample(index, {})

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of samples (the DataLoader's batched fetch): each shared input loaded once."""
        memo: dict[tuple[str, Hashable], Any] = {}
        return [self._sample(int(i), memo) for i in indices]

    def _sample(self, index: int, memo: dict[tuple[str, Hashable], Any]) -> dict[str, Any]:
        record = self.records[index]
        inputs: dict[str, Any] = {}
        refs: dict[str, Hashable] = {}
        for modality, encoder in self.encoders.items():
            ref = refs[modality] = record.inputs.get(modality)
            if ref is None:
                inputs[modality] = None
            elif modality in self.share and (modality, ref) in memo:
                inputs[modality] = memo[modality, ref]
            else:
                inputs[modality] = encoder.preprocess(encoder.load(ref), train=self.train)
                if modality in self.share:
                    memo[modality, ref] = inputs[modality]
        return {"index": index, "inputs": inputs, "refs": refs, "labels": dict(self.labels[index])}
