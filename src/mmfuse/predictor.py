"""A notebook API over pandas DataFrames: one model for several label columns, saved as an ordinary run directory.

    >>> from mmfuse import MultiTaskPredictor
    >>> predictor = MultiTaskPredictor(tasks=["color", "price"]).fit(train_df, time_limit=300)
    >>> predictor.predict(test_df)            # a DataFrame, one column per task
    >>> predictor.evaluate(test_df)           # {task: {metric: value}}
    >>> predictor.extract_embedding(test_df)  # (N, D) fused vectors
    >>> MultiTaskPredictor.load(predictor.path)  # any run directory `mmfuse train` wrote, too

`fit` infers each column's use (`mmfuse.infer`), prints the plan, writes the rows it trains on as JSONL beside the
run's checkpoints (`data/`), builds a run config from the plan and trains it with the same trainer as
`mmfuse train`. So `mmfuse evaluate / predict / serve / explain PATH` work on a fitted predictor's folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmfuse.infer import InputPlan, PlanError, _rows, plan_inputs

log = logging.getLogger(__name__)

# presets: what a run trains (epochs, and whether the pretrained encoders are fine-tuned or kept frozen and cached)
PRESETS: dict[str, dict[str, Any]] = {
    "medium_quality": {"freeze": True, "max_epochs": 10},
    "fast": {"freeze": True, "max_epochs": 3},
    "high_quality": {"freeze": False, "max_epochs": 10, "unfreeze": 2},
}


class MultiTaskPredictor:
    """One multi-task, multi-modal model fitted on a DataFrame.

    Args:
        tasks: the label columns: a list (kinds inferred from the values) or {column: kind} (binary, multiclass,
            multilabel, regression; None to infer).
        path: the run directory to write (default: `mmfuse_runs/predictor-<time>` in the current folder).
        inputs: {column: kind} overrides of the inferred plan (image, text, numeric, categorical, embedding, ignore).
        fusion: the fusion's registered name (`mmfuse list fusions`), or a dict of its options with `name`.
        seed: the run's seed.
        verbose: print the plan and one line per epoch.
    """

    def __init__(
        self,
        tasks: Sequence[str] | Mapping[str, str | None],
        path: str | Path | None = None,
        inputs: Mapping[str, str] | None = None,
        fusion: str | Mapping[str, Any] = "concat",
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        if isinstance(tasks, str) or not tasks:
            raise PlanError("tasks: give the label columns as a list or a {column: kind} dict")
        self.tasks = dict(tasks) if isinstance(tasks, Mapping) else dict.fromkeys(tasks)
        self.path = Path(path) if path is not None else Path("mmfuse_runs") / time.strftime("predictor-%Y%m%d-%H%M%S")
        self.inputs, self.seed, self.verbose = dict(inputs or {}), seed, verbose
        self.fusion = {"name": fusion, "output_dim": 256} if isinstance(fusion, str) else dict(fusion)
        self.plan: InputPlan | None = None
        self.summary: dict[str, Any] | None = None
        self._loaded: Any = None  # the run's mmfuse.predict.Predictor, opened on first use
        self._values: dict[str, dict[str, Any]] = {}  # per task: class name -> label value as given

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        train_data: Any,
        tuning_data: Any = None,
        time_limit: float | None = None,
        presets: str | None = None,
        data_root: str | Path | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
    ) -> MultiTaskPredictor:
        """Plan the inputs, train one model for every task, keep the best epoch (on `tuning_data`, else 10% of
        `train_data` held out by the seed) and evaluate it.

        Args:
            train_data: a DataFrame (or a list of row dicts).
            tuning_data: rows for model selection; default: 10% of `train_data`.
            time_limit: seconds; training stops after the epoch that crosses it (`train.time_limit`).
            presets: "medium_quality" (default: frozen pretrained encoders, their features cached), "fast" (the
                same, 3 epochs), "high_quality" (fine-tune the last 2 blocks of the pretrained encoders).
            data_root: the folder image paths are relative to (default: the current folder).
            hyperparameters: run-config overrides by dotted key, e.g. {"train.lr": 3e-4, "data.batch_size": 32}.
        """
        from mmfuse.config import RunConfig, apply_overrides

        if (self.path / "checkpoints").exists() and any((self.path / "checkpoints").iterdir()):
            raise PlanError(f"{self.path}: already holds a run; give the predictor another path")
        preset = PRESETS.get(presets or "medium_quality")
        if preset is None:
            raise PlanError(f"presets: unknown {presets!r}; choose one of {', '.join(PRESETS)}")
        if time_limit is not None and not (isinstance(time_limit, int | float) and time_limit > 0):
            raise PlanError(f"time_limit must be > 0 seconds, got {time_limit!r}")
        root = Path(data_root or Path.cwd()).resolve()
        self.plan = plan_inputs(train_data, self.tasks, self.inputs, root)
        if self.verbose:
            print(f"inputs of {self.path}:\n{self.plan}")
        rows = _rows(train_data)
        if tuning_data is None:
            rows, val_rows = hold_out(rows, self.plan, self.seed)
        else:
            val_rows = _rows(tuning_data)
        data_dir = self.path / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(data_dir / "train.jsonl", rows)
        data: dict[str, Any] = {"source": "records", "train": str((data_dir / "train.jsonl").resolve())}
        if val_rows:
            write_jsonl(data_dir / "val.jsonl", val_rows)
            data["val"] = str((data_dir / "val.jsonl").resolve())
        data |= {"root": str(root), "allow_outside_root": any_absolute(rows, self.plan), "num_workers": 0}
        raw = self._config(preset, data, time_limit)
        for task, options in raw["tasks"].items():  # the classes of every row: a class seen only in val is no error
            options |= task_fit(options["kind"], [r.get(task) for r in rows + val_rows])
        overrides = [f"{k}={json.dumps(v)}" for k, v in (hyperparameters or {}).items()]
        cfg = RunConfig.model_validate(apply_overrides(raw, overrides))
        with lightning_quiet(self.verbose):
            from mmfuse.train.run import train

            self.summary = train(cfg, self.path)
        self._loaded, self._values = None, {}
        return self

    def _config(self, preset: Mapping[str, Any], data: dict[str, Any], time_limit: float | None) -> dict[str, Any]:
        """The run config of the plan (the same YAML a user could write for `mmfuse train`)."""
        assert self.plan is not None
        encoders = self.plan.encoders(freeze=preset["freeze"])
        if not preset["freeze"]:
            for options in encoders.values():
                if options["name"] in ("timm", "hf_text"):
                    options["unfreeze"] = preset["unfreeze"]
        one_input = {"name": "concat", "output_dim": self.fusion.get("output_dim", 256)}  # nothing to fuse
        fusion = self.fusion if len(encoders) > 1 else one_input
        train: dict[str, Any] = {"max_epochs": preset["max_epochs"], "progress_bar": self.verbose}
        if not preset["freeze"]:
            train |= {"encoder_lr": 1e-4, "layer_decay": 0.8}
        if time_limit is not None:
            train["time_limit"] = time_limit
        return {
            "name": self.path.name,
            "seed": self.seed,
            "model": {"encoders": encoders, "fusion": fusion, "head": {"hidden_dims": [256], "dropout": 0.1}},
            "tasks": {t: {"kind": k} for t, k in self.plan.tasks.items()},
            "data": data,
            "train": train,
        }

    # ------------------------------------------------------------------ using
    @property
    def run(self) -> Any:
        """The fitted run as `mmfuse predict` loads it (an `mmfuse.predict.Predictor`)."""
        if self._loaded is None:
            if not (self.path / "model.safetensors").is_file():
                raise PlanError(f"{self.path}: no fitted model; call fit() first or load() a run directory")
            from mmfuse.predict import Predictor

            self._loaded = Predictor(self.path)
        return self._loaded

    def _records(self, data: Any, data_root: str | Path | None) -> list[Any]:
        """The rows as the run's records, read and checked the way `mmfuse predict --input` reads a file."""
        rows = _rows(data)
        if not rows:
            raise PlanError("no rows to predict")
        root, outside = self._location(data_root)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rows.jsonl"
            write_jsonl(path, rows)
            records = self.run.records_from_file(path, root=root, allow_outside_root=outside)
        good, _ = self.run.check(records)
        return good

    def _location(self, data_root: str | Path | None) -> tuple[Path, bool]:
        """(the folder file paths resolve against, whether absolute paths are accepted): the run's own unless
        `data_root` is given (default for a CLI run without data.root: the current folder)."""
        from mmfuse.builders import data_location

        root, outside = data_location(self.run.config)
        return Path(data_root or root or Path.cwd()).resolve(), outside

    def predict(self, data: Any, data_root: str | Path | None = None) -> Any:
        """A DataFrame with one column per task: the class (binary, multiclass), the list of labels (multilabel)
        or the value (regression), row by row in the order given."""
        pd = pandas()

        results = self.run.predict(self._records(data, data_root))
        columns = {}
        for task in self.run.model.tasks:
            values = self._label_values(task)  # class name -> the value as the training column held it
            columns[task] = [as_given(pick(r[task]), values) for r in results]
        return pd.DataFrame(columns, index=getattr(data, "index", None))

    def _label_values(self, task: str) -> dict[str, Any]:
        """{class name: the label as written in the training rows} (0 and 1 stay numbers, True stays a bool);
        empty for a run without its training rows beside it (then class names are answered)."""
        from mmfuse.tasks.base import class_name

        if task not in self._values:
            path, values = self.path / "data" / "train.jsonl", {}
            if path.is_file():
                for line in path.read_text(encoding="utf-8").splitlines():
                    raw = json.loads(line).get(task)
                    if isinstance(raw, str | int | float | bool):
                        values.setdefault(class_name(raw), raw)
            self._values[task] = values
        return self._values[task]

    def predict_proba(self, data: Any, data_root: str | Path | None = None) -> dict[str, Any]:
        """{task: a DataFrame of class probabilities (one column per class)} for every task with classes."""
        pd = pandas()

        results = self.run.predict(self._records(data, data_root))
        index = getattr(data, "index", None)
        return {
            t: pd.DataFrame([r[t]["probabilities"] for r in results], index=index)
            for t in self.run.model.tasks
            if "probabilities" in results[0][t]
        }

    def evaluate(self, data: Any, data_root: str | Path | None = None) -> dict[str, dict[str, float]]:
        """{task: {metric: value}} on labelled rows, computed by the run's own metrics (as `mmfuse evaluate`)."""
        from mmfuse.train.run import evaluate

        rows = _rows(data)
        missing = [t for t in self.run.model.tasks if rows and t not in rows[0]]
        if missing:
            raise PlanError(f"evaluate: task column {missing[0]!r} is not in the data")
        root, _ = self._location(data_root)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "eval.jsonl"
            write_jsonl(path, rows)
            overrides = [f"data.test={json.dumps(str(path))}", f"data.root={json.dumps(str(root))}"]
            with lightning_quiet(False):
                return evaluate(self.path, "test", overrides)

    def extract_embedding(
        self, data: Any, per_modality: bool = False, data_root: str | Path | None = None, batch_size: int = 64
    ) -> np.ndarray | dict[str, np.ndarray]:
        """The fused vector of every row, (N, D_out); with `per_modality`, {modality: its pooled encoder output}."""
        import torch

        from mmfuse.utils import move_to

        run, fused, parts = self.run, [], {}
        with torch.inference_mode():
            for batch in run.batches(self._records(data, data_root), batch_size):
                inputs = move_to(batch["inputs"], run.device)
                absent = {m: a.to(run.device) for m, a in batch.get("absent", {}).items()}
                out = run.model(inputs, absent=absent or None)
                fused.append(out.fusion.fused.float().cpu().numpy())
                for m, f in out.features.items():
                    parts.setdefault(m, []).append(f.pooled.float().cpu().numpy())
        if per_modality:
            return {m: np.concatenate(v) for m, v in parts.items()}
        return np.concatenate(fused)

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path) -> Path:
        """Copy the run directory to `path` (a run keeps working moved or copied) and return it."""
        target = Path(path)
        if target.resolve() == self.path.resolve():
            return target
        if target.exists() and any(target.iterdir()):
            raise PlanError(f"{target}: not empty; save to a new folder")
        shutil.copytree(self.path, target, dirs_exist_ok=True)
        return target

    @classmethod
    def load(cls, path: str | Path, verbose: bool = True) -> MultiTaskPredictor:
        """Open a run directory (written by `fit` or by `mmfuse train`)."""
        from mmfuse.predict import Predictor

        path = Path(path)
        if not (path / "config.yaml").is_file() or not (path / "model.safetensors").is_file():
            raise PlanError(f"{path}: not a finished run directory (no config.yaml and model.safetensors)")
        run = Predictor(path)
        predictor = cls(tasks=list(run.model.tasks), path=path, verbose=verbose)
        predictor._loaded = run
        metrics = path / "metrics.json"
        predictor.summary = json.loads(metrics.read_text()) if metrics.is_file() else None
        return predictor

    def export(self, out_dir: str | Path, format: str = "onnx") -> Path:
        """Export the model (preprocessed tensors -> every task's logits) as `mmfuse export` does."""
        from mmfuse.export import export_run

        return export_run(self.path, out_dir, format=format)

    def __repr__(self) -> str:
        tasks = ", ".join(f"{t}: {k or '?'}" for t, k in self._task_kinds().items())
        head = f"MultiTaskPredictor(path={str(self.path)!r}, tasks={{{tasks}}})"
        if self.summary is None:
            return head + ": not fitted"
        records = self.summary.get("records", {})
        lines = [head, f"  trained on {records.get('train', '?')} rows, tuned on {records.get('val', 0)}"]
        for split in ("test", "val"):
            scores = self.summary.get("metrics", {}).get(split)
            if scores:
                lines.append(f"  {split} metrics: " + "; ".join(f"{t} {short(m)}" for t, m in scores.items()))
                break
        return "\n".join(lines)

    def _task_kinds(self) -> dict[str, str | None]:
        if self._loaded is not None:
            return {t: task.kind for t, task in self._loaded.model.tasks.items()}
        return dict(self.plan.tasks) if self.plan is not None else dict(self.tasks)


@contextlib.contextmanager
def lightning_quiet(epoch_lines: bool) -> Any:
    """Lightning's info lines (devices, tips) off while inside; with `epoch_lines`, mmfuse's one line per epoch
    printed to stderr (outside a terminal or notebook, where a progress bar draws instead)."""
    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import: override them after)

    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    epochs = logging.getLogger("mmfuse.train.run")
    handler = logging.StreamHandler(sys.stderr) if epoch_lines else None
    if handler is not None:
        handler.setLevel(logging.INFO)
        epochs.addHandler(handler)
        old_level, epochs.level = epochs.level, logging.INFO
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if handler is not None:
            epochs.removeHandler(handler)
            epochs.setLevel(old_level)


def hold_out(
    rows: list[dict[str, Any]], plan: InputPlan, seed: int, fraction: float = 0.1
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, val rows): `fraction` of the rows held out by the seed for model selection (none under 10 rows).

    Rows that share a file (many questions about one image) are held out together, so no validation row sees an
    image that training saw: the first image column groups them; without one, every row is its own group.
    """
    if len(rows) < 10:
        return rows, []
    images = [c for c, k in plan.columns.items() if k == "image"]
    keys = [r.get(images[0]) if images else i for i, r in enumerate(rows)]
    groups = list(dict.fromkeys(keys))  # in first-seen order
    order = np.random.default_rng(seed).permutation(len(groups))
    n_val = max(1, round(fraction * len(groups)))
    held = {groups[i] for i in order[:n_val]}
    return [r for r, k in zip(rows, keys) if k not in held], [r for r, k in zip(rows, keys) if k in held]


def task_fit(kind: str, labels: Sequence[Any]) -> dict[str, Any]:
    """What a task kind learns from its labels (a classifier's sorted class names), as `mmfuse train` learns it."""
    from mmfuse.tasks import TASK_KINDS

    return TASK_KINDS.get(kind).fit([v for v in labels if v is not None], {})


def pandas() -> Any:
    """The pandas module, or one line saying how to install it."""
    try:
        import pandas as pd
    except ImportError:
        raise PlanError("MultiTaskPredictor returns pandas DataFrames: pip install 'mmfuse[notebook]'") from None
    return pd


def pick(described: Mapping[str, Any]) -> Any:
    """A task's answer for one row: its label, labels or value."""
    for key in ("label", "labels", "value"):
        if key in described:
            return described[key]
    raise KeyError(f"no label, labels or value in {sorted(described)}")


def as_given(answer: Any, values: Mapping[str, Any]) -> Any:
    """A class name (or a list of them) as the training labels wrote it; other answers unchanged."""
    if isinstance(answer, list):
        return [values.get(a, a) for a in answer]
    return values.get(answer, answer) if isinstance(answer, str) else answer


def short(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in list(metrics.items())[:2])


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows -> JSON lines (numpy scalars and arrays as numbers and lists, missing values as null)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: plain(v) for k, v in row.items()}, allow_nan=False) + "\n")


def plain(value: Any) -> Any:
    """A JSON-ready value: numpy types to Python, NaN to None."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def any_absolute(rows: Sequence[Mapping[str, Any]], plan: InputPlan) -> bool:
    """Whether an image column names an absolute path (then the run reads outside its data root)."""
    images = [c for c, k in plan.columns.items() if k == "image"]
    return any(isinstance(r.get(c), str) and Path(r[c]).expanduser().is_absolute() for r in rows for c in images)
