"""The ONNX engine of `mmfuse predict`: a run's ONNX export (`mmfuse export RUN`, in RUN/export) run with onnxruntime,
its inputs read and preprocessed with PIL, numpy and the `tokenizers` package as `export.json` describes, without
importing torch, transformers, timm or Lightning: a fresh process answers in a fraction of the PyTorch engine's time.

Shapes: B batch, C_t outputs of task t.

What it cannot do is refused in one line naming the run, the file or the field (`EngineError`): no export, an export
of other weights or another config than the run's (trained again after the export), an export.json written before
this engine, an input its encoder reads in a way this engine does not know, a text without a fast tokenizer, a
missing package, and a record lacking an input (the graph has no absent masks). `mmfuse predict --engine auto` then
uses the PyTorch engine instead and logs why.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmfuse.config import check_run_dir
from mmfuse.data.records import DataError, Record, keep_good
from mmfuse.export import DEFAULT_DIR, ExportError
from mmfuse.export.answers import KINDS, Answers
from mmfuse.export.feeds import FEEDS, Feed
from mmfuse.io import sha256_file
from mmfuse.predict import RunInputs
from mmfuse.raw_inputs import InputError

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnx")


class EngineError(ExportError):
    """What the ONNX engine cannot do, as one line naming the run, the file or the field (exit 2)."""


def export_folder(run_dir: str | Path, onnx_dir: str | Path | None = None) -> Path:
    """Where the run's ONNX export is: `onnx_dir`, else RUN/export."""
    return Path(onnx_dir) if onnx_dir is not None else Path(run_dir) / DEFAULT_DIR


def read_export(run_dir: str | Path, onnx_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """(export folder, its export.json), checked to be an ONNX export of this run's config and weights that this
    engine can read.

    Raises:
        EngineError: one line: no export, not ONNX, written before this engine, of another config or other weights
            (older than the run's checkpoint), the model file missing.
    """
    run = check_run_dir(run_dir)
    folder = export_folder(run, onnx_dir)
    path = folder / "export.json"
    if not path.is_file():
        raise EngineError(
            f"{run}: no ONNX export in {folder} (write one with `mmfuse export {run}`), or predict with --engine torch"
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EngineError(f"{path}: not readable JSON ({type(err).__name__}); export the run again") from None
    if info.get("format") != "onnx":
        raise EngineError(f"{path}: a {info.get('format')!r} export; the onnx engine runs ONNX files (mmfuse export)")
    for key in ("reading", "weights", "outputs", "inputs", "preprocessing"):
        if key not in info:
            raise EngineError(
                f"{path}: no {key!r} key (written by an mmfuse before the onnx engine): export the run again with "
                f"`mmfuse export {run}`"
            )
    _check_current(run, path, info)
    if not (folder / info["file"]).is_file():
        raise EngineError(f"{path}: its model file {folder / info['file']} is missing; export the run again")
    return folder, info


def _check_current(run: Path, path: Path, info: Mapping[str, Any]) -> None:
    """Refuse an export of another config.yaml or other weights than the run's (size and mtime first, then sha256)."""
    again = f"export it again (`mmfuse export {run}`) or predict with --engine torch"
    if sha256_file(run / "config.yaml") != info.get("config_sha256"):
        raise EngineError(f"{path}: exported from another config.yaml than {run / 'config.yaml'}: {again}")
    weights, recorded = run / "model.safetensors", info["weights"]
    stat = weights.stat()
    if (stat.st_size, stat.st_mtime_ns) == (recorded.get("size"), recorded.get("mtime_ns")):
        return
    if sha256_file(weights) != recorded.get("sha256"):
        raise EngineError(f"{path}: older than the run's checkpoint {weights} (other weights): {again}")


def build_feeds(path: Path, info: Mapping[str, Any]) -> dict[str, Feed]:
    """{modality: its Feed} from export.json, in the graph's input order.

    Raises:
        EngineError: an input read by an encoder this engine does not know, a text without a fast tokenizer, a
            task kind it cannot answer, a missing package (onnxruntime, tokenizers, PIL).
    """
    for out in info["outputs"]:
        if out["kind"] not in KINDS:
            raise EngineError(
                f"{path}: task {out['name']!r} is a {out['kind']} task, which the onnx engine cannot answer "
                f"(it knows {', '.join(KINDS)}); predict with --engine torch"
            )
    needs = {"onnxruntime": "onnxruntime"}
    feeds: dict[str, Feed] = {}
    for m, how in info["reading"]["inputs"].items():
        pre, reads = info["preprocessing"][m], how.get("reads")
        if reads not in FEEDS:
            raise EngineError(
                f"{path}: input {m!r} is read by {pre.get('encoder')}, which the onnx engine cannot preprocess "
                f"(it knows image files, texts, table rows and vectors); predict with --engine torch"
            )
        if reads == "text" and "tokenizer_file" not in pre:
            raise EngineError(
                f"{path}: preprocessing.{m} has no tokenizer_file (the encoder's tokenizer is not a fast one); "
                "predict with --engine torch"
            )
        needs |= {"text": {"tokenizers": "tokenizers"}, "image_file": {"PIL": "Pillow"}}.get(reads, {})
    missing = [pip for module, pip in needs.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise EngineError(
            f"the onnx engine needs {', '.join(missing)} (not installed): pip install 'mmfuse[export]', "
            "or predict with --engine torch"
        )
    for m, how in info["reading"]["inputs"].items():
        feeds[m] = FEEDS[how["reads"]](m, info["preprocessing"][m], how["row_keys"], path.parent)
    return feeds


class FeedSchema:
    """Rows -> records through the feeds (as `mmfuse.data.records.Schema` does through the encoders)."""

    def __init__(self, feeds: Mapping[str, Feed], fields: Mapping[str, str]) -> None:
        self.feeds, self.fields = dict(feeds), dict(fields)

    def row_keys(self, modality: str) -> list[str]:
        return self.feeds[modality].row_keys

    def record(self, row: Mapping[str, Any], where: str, root: Any, required: bool) -> Any:
        """One parsed row -> Record; DataError "WHERE: modality: ..." for a bad value (`required` is not used: a
        prediction's record may lack inputs)."""
        inputs = {}
        for m, feed in self.feeds.items():
            try:
                inputs[m] = feed.read(row, self.fields[m], root)
            except InputError as err:
                raise DataError(f"{where}: {m}: {err}") from None
        return Record(inputs, {}, where)


class OnnxPredictor(RunInputs):
    """A run's ONNX export run with onnxruntime; the same reading, checks and answers as `mmfuse.predict.Predictor`.

    Args:
        run_dir: a finished run directory.
        onnx_dir: its export folder (default RUN/export).
        threads: onnxruntime's intra-op threads (None: its default, one per core).

    Raises:
        EngineError: what `read_export` and `build_feeds` refuse; a model file onnxruntime cannot load.
    """

    def __init__(self, run_dir: str | Path, onnx_dir: str | Path | None = None, threads: int | None = None) -> None:
        self.folder, self.info = read_export(run_dir, onnx_dir)
        self.export_json = self.folder / "export.json"
        reading = self.info["reading"]
        self.feeds = build_feeds(self.export_json, self.info)
        self.modalities = list(self.feeds)
        self.schema = FeedSchema(self.feeds, {m: how["field"] for m, how in reading["inputs"].items()})
        self._other_fields = set(reading["other_fields"])
        self.trained_for_missing = bool(reading["trained_for_missing"])
        self.input_names = [i["name"] for i in self.info["inputs"]]
        self.dtypes = {i["name"]: np.dtype(i["dtype"]) for i in self.info["inputs"]}
        self.answers = Answers(self.info["outputs"])
        self.model_file = self.folder / self.info["file"]
        self.session = _session(self.model_file, threads)

    # ------------------------------------------------------------------ checking
    def _problem(self, record: Any, allow_missing: bool) -> str | None:
        problem = super()._problem(record, allow_missing)
        lacking = [m for m in self.modalities if record.inputs.get(m) is None]
        if problem is None and lacking:  # the PyTorch engine would predict it without the input; the graph cannot
            raise EngineError(
                f"{record.source}: no {lacking[0]} input; the ONNX export ({self.export_json}) takes every input "
                "(the graph has no absent masks): predict it with --engine torch"
            )
        return problem

    def _check_inputs(self, records: list[Any], skip_bad: bool) -> tuple[list[Any], list[tuple[str, str]]]:
        checked: dict[str, dict[Hashable, str | None]] = {m: {} for m in self.feeds}

        def problem_of(record: Record) -> str | None:
            for m, feed in self.feeds.items():
                ref = record.inputs[m]
                if ref not in checked[m]:
                    checked[m][ref] = _check(feed, ref)
                if (problem := checked[m][ref]) is not None:
                    return problem if problem.startswith(m) else f"{m}: {problem}"
            return None

        good, bad = keep_good(records, problem_of, skip_bad)
        if bad:
            log.warning("skipped %d of %d records (first: %s: %s)", len(bad), len(records), *bad[0])
        return good, bad

    # ------------------------------------------------------------------ predicting
    def logits(self, records: Sequence[Any]) -> list[np.ndarray]:
        """One forward pass of `records` (checked): one (B, C_t) array per task, in export.json's output order."""
        arrays: dict[str, np.ndarray] = {}
        for m, feed in self.feeds.items():
            loaded: dict[Hashable, Any] = {}  # a shared input (many questions about one image) is loaded once
            for r in records:
                if r.inputs[m] not in loaded:
                    loaded[r.inputs[m]] = feed.load(r.inputs[m])
            arrays |= feed.collate([loaded[r.inputs[m]] for r in records])
        feed_dict = {n: arrays[n].astype(self.dtypes[n], copy=False) for n in self.input_names}
        return list(self.session.run(self.answers.names, feed_dict))

    def predict(self, records: Sequence[Any], batch_size: int = 64) -> list[dict[str, Any]]:
        """Per record, {task: the task kind's description of its prediction}. Check records first (`check`)."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(records), batch_size):
            results += self.answers.describe(self.logits(records[start : start + batch_size]))
        return results

    def format(self, result: Mapping[str, Any], top: int = 3) -> list[str]:
        """Terminal lines of one record's result: "task: <the kind's short form>"."""
        return [f"{name}: {self.answers.format(name, r, top)}" for name, r in result.items()]


def _check(feed: Feed, ref: Hashable) -> str | None:
    try:
        return feed.check(ref)
    except Exception as err:  # a check must give a reason, never stop the whole validation
        return f"{type(err).__name__}: {str(err)[:160]}"


def _session(path: Path, threads: int | None) -> Any:
    """An onnxruntime CPU session of the model file. Raises EngineError when onnxruntime cannot load it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the optimiser's notes are not the user's business
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for a truncated or invalid file
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise EngineError(f"{path}: onnxruntime cannot load it ({first}); export the run again") from None
