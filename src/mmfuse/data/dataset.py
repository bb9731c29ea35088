"""Up-front record validation and the map-style dataset that feeds the processors.

`validate_records` finds every bad record before training starts (a missing or truncated image,
an empty text, a label its task rejects), so a run never dies at step 9,000 on one broken file.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from mmfuse.data.records import DataError, Record
from mmfuse.tasks import LabelError, Task

logger = logging.getLogger(__name__)

MODALITIES = ("image", "text")


def check_image(path: str) -> str | None:
    """None if `path` is an image file that decodes fully, else the reason it is not."""
    p = Path(path)
    if not p.is_file():
        where = "is a folder" if p.is_dir() else "not found"
        return f"image {p.name!r} {where} (looked in {p.parent})"
    try:
        with Image.open(p) as im:
            im.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return f"image {p.name!r} cannot be decoded ({type(err).__name__}: {err}) at {p}"
    return None


def _check_images(paths: Collection[str], workers: int) -> dict[str, str | None]:
    paths = list(paths)
    if workers <= 1 or len(paths) < 64:
        return {p: check_image(p) for p in paths}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(check_image, paths, chunksize=32)))


def _encode_error(task: Task, raw: Any) -> str | None:
    try:
        task.encode(raw)
    except (LabelError, TypeError, ValueError) as err:
        return f"task {task.name!r}: {err}"
    return None


def _record_problem(
    record: Record,
    tasks: Mapping[str, Task],
    modalities: Collection[str],
    images: Mapping[str, str | None],
    allow_missing: bool,
) -> str | None:
    if "image" in modalities:
        if record.image is None:
            if not allow_missing:
                return "image is empty or missing"
        elif images[record.image] is not None:
            return images[record.image]
    if "text" in modalities:
        if record.text is None:
            if not allow_missing:
                return "text is empty or missing"
        elif not isinstance(record.text, str):
            return f"text must be a string, got {type(record.text).__name__}"
        elif not record.text.strip():
            return "text is empty or missing"
    for name, task in tasks.items():
        raw = record.labels.get(name)
        if raw is not None and (problem := _encode_error(task, raw)):
            return problem
    return None


def validate_records(
    records: Sequence[Record],
    tasks: Mapping[str, Task],
    modalities: Collection[str],
    skip_bad: bool = False,
    *,
    allow_missing: bool = False,
    workers: int | None = None,
) -> tuple[list[Record], list[tuple[str, str]]]:
    """Check every record: its image decodes fully, its text is non-empty, its labels encode.

    Each distinct image path is decoded once (in a small thread pool).

    Args:
        records: the records to check.
        tasks: {task name: Task}; every non-missing label must be accepted by `task.encode`.
        modalities: the modalities the model reads ("image", "text"); only those are checked.
        skip_bad: return the bad records' reasons instead of raising on the first one.
        allow_missing: a record without an image or text (None) is fine (prediction time).
        workers: threads decoding images; default min(4, CPU count).

    Returns:
        (good records, [(source, reason), ...] for the bad ones).

    Raises:
        DataError: "SOURCE: reason" for the first bad record, unless `skip_bad`.
    """
    paths = {r.image for r in records if r.image is not None} if "image" in modalities else set()
    images = _check_images(paths, workers if workers is not None else min(4, os.cpu_count() or 1))
    good, bad = [], []
    for record in records:
        problem = _record_problem(record, tasks, modalities, images, allow_missing)
        if problem is None:
            good.append(record)
        elif skip_bad:
            bad.append((record.source, problem))
        else:
            raise DataError(f"{record.source}: {problem}")
    for name in tasks:
        if records and all(r.labels.get(name) is None for r in records):
            logger.warning("task %r has no label in any of the %d records", name, len(records))
    if bad:
        logger.warning("skipped %d of %d records (first: %s: %s)", len(bad), len(records), *bad[0])
    return good, bad


def takes_train(processor: Any) -> bool:
    """Whether `processor.preprocess` takes a `train` argument."""
    try:
        return "train" in inspect.signature(processor.preprocess).parameters
    except (TypeError, ValueError):
        return False


def preprocess(processor: Any, raw: Any, train: bool, takes: bool | None = None) -> Any:
    """processor.preprocess(raw, train=train), or (raw) for a processor without a `train` argument."""
    if takes if takes is not None else takes_train(processor):
        return processor.preprocess(raw, train=train)
    return processor.preprocess(raw)


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
        except (LabelError, TypeError, ValueError) as err:
            raise DataError(f"{record.source}: task {name!r}: {err}") from None
    return out


class MultiModalDataset(Dataset):
    """Records -> {"index": i, "inputs": {modality: preprocessed or None}, "labels": {task: encoded or None}}.

    Args:
        records: the samples (validate them first with `validate_records`).
        tasks: {task name: Task}; labels are encoded once, here.
        processors: {"image": obj with preprocess(PIL image), "text": obj with preprocess(str)}; a
            modality is loaded when its key is present. `preprocess` gets `train=` when it takes it.
        train: passed to the processors (augmentation on or off).
    """

    def __init__(
        self, records: Sequence[Record], tasks: Mapping[str, Task], processors: Mapping[str, Any], train: bool = False
    ) -> None:
        unknown = set(processors) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)} (known: {', '.join(MODALITIES)})")
        self.records = list(records)
        self.tasks = dict(tasks)
        self.processors = dict(processors)
        self.train = train
        self.labels = [encode_labels(r, self.tasks) for r in self.records]
        self._takes_train = {m: takes_train(p) for m, p in self.processors.items()}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        inputs: dict[str, Any] = {}
        for modality, processor in self.processors.items():
            raw = self._raw(record, modality)
            takes = self._takes_train[modality]
            inputs[modality] = None if raw is None else preprocess(processor, raw, self.train, takes)
        return {"index": index, "inputs": inputs, "labels": dict(self.labels[index])}

    @staticmethod
    def _raw(record: Record, modality: str) -> Any:
        if modality == "text":
            return record.text
        if record.image is None:
            return None
        with Image.open(record.image) as im:
            return im.convert("RGB")
