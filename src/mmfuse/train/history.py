"""The run's metric history, kept inside its checkpoints so that a resumed run logs every epoch exactly once.

Lightning's CSV logger deletes `logs/metrics.csv` when a run restarts in the same directory, and it
flushes only every 100 log calls, so a `kill -9` loses rows that a checkpoint already covers. Here
every row logged is also kept in memory; `KeepHistory` stores those rows in each checkpoint, and a
resumed run starts its CSV from the checkpoint's rows: the rows of epochs the checkpoint covers are
kept, those of the interrupted epoch (logged after it) are dropped, then the resumed epochs follow.
The file is rewritten whole (atomically) on the first flush and when a column appears; otherwise appended to.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

Row = dict[str, Any]


class _HistoryWriter(ExperimentWriter):
    """An ExperimentWriter that keeps every row and rewrites the whole CSV file from them."""

    def __init__(self, log_dir: str, rows: Sequence[Row]) -> None:
        self.history: list[Row] = [dict(r) for r in rows]
        self._written, self._keys = 0, []  # rows of `history` in the file, and its header
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Keep the existing file: the first `save` replaces it with the history (the parent deletes it here)."""

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        self.history.append(self.metrics[-1])

    def save(self) -> None:
        """Append the new rows; rewrite the whole file (atomically) on the first save or when a column appears."""
        self.metrics = []
        keys = sorted({k for r in self.history for k in r})
        if self._written and keys == self._keys and os.path.exists(self.metrics_file_path):
            with open(self.metrics_file_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=keys).writerows(self.history[self._written :])
        else:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
            tmp = os.path.join(self.log_dir, f".{self.NAME_METRICS_FILE}.tmp")
            with open(tmp, "w", newline="") as f:
                f.write(buf.getvalue())
            os.replace(tmp, self.metrics_file_path)
        self._written, self._keys = len(self.history), keys


class HistoryCSVLogger(CSVLogger):
    """`CSVLogger` whose rows survive a resume: start it with the rows of the checkpoint being resumed.

    Args:
        save_dir: the run directory (the file is `save_dir/logs/metrics.csv`).
        rows: rows already logged by the interrupted run, from its checkpoint.
    """

    def __init__(self, save_dir: str | os.PathLike[str], rows: Sequence[Row] = ()) -> None:
        super().__init__(save_dir, name="logs", version="")
        self._initial_rows = list(rows)

    @property
    @rank_zero_experiment
    def experiment(self) -> _HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self._initial_rows)
        return self._experiment

    @property
    def rows(self) -> list[Row]:
        """Every row logged so far (on the logging rank; empty elsewhere)."""
        if self._experiment is None:
            return list(self._initial_rows)
        return list(getattr(self._experiment, "history", []))


class KeepHistory(Callback):
    """Stores the CSV logger's rows in every checkpoint (under `callbacks`, as plain lists and numbers)."""

    def __init__(self, logger: HistoryCSVLogger) -> None:
        self.logger = logger

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.logger.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to do: the run reads the rows before building its logger (`rows_of`)."""


def rows_of(checkpoint: dict[str, Any]) -> list[Row]:
    """The rows a checkpoint written with `KeepHistory` carries ([] for other checkpoints)."""
    state = checkpoint.get("callbacks", {}).get(KeepHistory.__qualname__, {})
    rows = state.get("rows", []) if isinstance(state, dict) else []
    return [r for r in rows if isinstance(r, dict)]
