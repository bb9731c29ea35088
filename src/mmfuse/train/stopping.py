"""When a run stops before `max_epochs`: early stopping on the monitored metric, and a time limit.

- `EarlyStop` is Lightning's `EarlyStopping` on `train.monitor` (its direction as the run knows it). Its counter and
  best score come back with `--resume` (Lightning keeps them in the checkpoint); the patience and min_delta in
  effect are the config's, so `--resume --set train.early_stopping.patience=N` applies.
- `TimeLimit` is Lightning's `Timer`, checked at each epoch end only (after validation; the epoch's checkpoints are
  still written), so a finished epoch is never lost. It counts this session's fit time: nothing of it is resumed.

`stop_reason` says which of them stopped the run, or "max_epochs", in words for metrics.json and report.md.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, Timer
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from mmfuse.builders import TrainOptions
from mmfuse.config import ConfigError


class EarlyStop(EarlyStopping):
    """`EarlyStopping` that keeps the configured patience on resume and reports only this session's stop."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience  # the config's, not the checkpoint's
        self.stopping_reason, self.stopping_reason_message = EarlyStoppingReason.NOT_STOPPED, None

    def reason(self) -> str | None:
        """Why it stopped the run in this session, in words; None when it did not."""
        if self.stopping_reason == EarlyStoppingReason.NOT_STOPPED:
            return None
        if self.stopping_reason != EarlyStoppingReason.PATIENCE_EXHAUSTED:  # a NaN or infinite metric
            return f"early_stopping ({self.monitor} was not finite after epoch {self.stopped_epoch + 1})"
        best_epoch = self.stopped_epoch + 1 - self.wait_count  # 1-based, as the report counts epochs
        return (
            f"early_stopping (no improvement of {self.monitor} greater than {abs(self.min_delta):g} "
            f"for {self.wait_count} epoch{'s' if self.wait_count != 1 else ''} after epoch {best_epoch})"
        )


class TimeLimit(Timer):
    """`Timer` checked at each epoch end; it counts this session's fit time only (no state in the checkpoint)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(duration=timedelta(seconds=seconds), interval="epoch", verbose=False)
        self.seconds = seconds
        self.stopped_after: int | None = None  # epochs done when it stopped the run

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_stopping = trainer.should_stop
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.should_stop and not was_stopping:
            self.stopped_after = trainer.current_epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing to resume: a session's limit is its own

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None

    def reason(self) -> str | None:
        if self.stopped_after is None:
            return None
        return f"time_limit ({self.seconds:g} s reached after epoch {self.stopped_after})"


def check_stopping(t: TrainOptions, has_val: bool) -> None:
    """Refuse early stopping that has nothing to monitor, before any training.

    Raises:
        ConfigError: `train.early_stopping` is set but the run has no validation records.
    """
    if t.early_stopping_patience is not None and not has_val:
        raise ConfigError(
            "train.early_stopping: needs validation records to monitor, and the data has none "
            "(set data.val_fraction > 0 or data.val, or leave train.early_stopping out)"
        )


def stopping_callbacks(t: TrainOptions, monitor: str | None, mode: str) -> list[Callback]:
    """The callbacks that may stop a run early: `EarlyStop` on `monitor` and `TimeLimit`, as configured."""
    callbacks: list[Callback] = []
    if t.early_stopping_patience is not None and monitor is not None:
        callbacks.append(
            EarlyStop(
                monitor=monitor, mode=mode, patience=t.early_stopping_patience, min_delta=t.early_stopping_min_delta
            )
        )
    if t.time_limit is not None:
        callbacks.append(TimeLimit(t.time_limit))
    return callbacks


def drop_unused_state(ckpt: dict[str, Any], callbacks: list[Callback]) -> None:
    """A run resumed with early stopping turned off forgets its counter (Lightning would warn that the checkpoint's
    callback is missing and ask to add it back)."""
    states = ckpt.get("callbacks")
    if not isinstance(states, dict) or any(isinstance(c, EarlyStop) for c in callbacks):
        return
    for key in [k for k in states if str(k).startswith(f"{EarlyStop.__qualname__}{{")]:
        del states[key]


def stop_reason(trainer: L.Trainer) -> str:
    """Why the fit ended: the stopping callbacks' reasons ("; "-joined when both fired), else "max_epochs"."""
    reasons = [r for c in trainer.callbacks if isinstance(c, (EarlyStop, TimeLimit)) and (r := c.reason())]
    return "; ".join(reasons) or "max_epochs"
