"""The run's metric history, kept inside its checkpoints so that a resumed run logs every epoch exactly once.

Lightning's CSV logger deletes `logs/metrics.csv` when a run restarts in the same directory, and it
flushes only every 100 log calls, so a `kill -9` loses rows that a checkpoint already covers. Here (a logger
on Lightning's public `Logger` API) every row logged is kept in memory and written at each `save`;
`KeepHistory` stores those rows in each checkpoint, and a resumed run starts its CSV from the checkpoint's
rows: the rows of epochs the checkpoint covers are kept, those of the interrupted epoch (logged after it) are
dropped, then the resumed epochs follow. The file is rewritten whole (atomically) on the first save and when
a column appears; otherwise appended to.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from mmfuse.io import atomic_write_text

Row = dict[str, Any]
METRICS_FILE = "metrics.csv"


class HistoryCSVLogger(Logger):
    """A CSV logger (Lightning's public `Logger` API) whose rows survive a resume: start it with the rows of the
    checkpoint being resumed. Writes `save_dir/logs/metrics.csv`: one row per `log_metrics` call, the columns
    sorted, `step` last in each row as Lightning's `CSVLogger` writes it.

    Args:
        save_dir: the run directory.
        rows: rows already logged by the interrupted run, from its checkpoint.
    """

    def __init__(self, save_dir: str | os.PathLike[str], rows: Sequence[Row] = ()) -> None:
        super().__init__()
        self._save_dir = os.fspath(save_dir)
        self.history: list[Row] = [dict(r) for r in rows]
        self._written, self._keys = 0, []  # rows of `history` in the file, and its header
        self._columns = {k for r in self.history for k in r}  # every key logged: kept as rows come, not rescanned

    @property
    def name(self) -> str:
        return "logs"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return os.path.join(self._save_dir, self.name)

    @property
    def rows(self) -> list[Row]:
        """Every row logged so far, the checkpoint's first (on the logging rank; the checkpoint's elsewhere)."""
        return [dict(r) for r in self.history]

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing: the run's resolved config.yaml is its hyperparameters."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        row["step"] = len(self.history) if step is None else step
        self.history.append(row)
        self._columns.update(row)

    @rank_zero_only
    def save(self) -> None:
        """Append the new rows; rewrite the whole file (atomically) on the first save or when a column appears."""
        path = os.path.join(self.log_dir, METRICS_FILE)
        keys = sorted(self._columns)  # (a scan of every row here made each save, every logged step, O(rows))
        if self._written and keys == self._keys and os.path.exists(path):
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=keys).writerows(self.history[self._written :])
        else:
            os.makedirs(self.log_dir, exist_ok=True)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
            atomic_write_text(path, buf.getvalue())  # the csv module's own line ends, kept as written
        self._written, self._keys = len(self.history), keys

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


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
