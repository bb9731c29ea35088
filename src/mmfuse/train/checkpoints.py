"""A run's checkpoints: read safely, written atomically, and named relative to the run directory.

- `load_checkpoint` reads with `weights_only=True` (tensors and plain containers, never code) and checks
  that every weight is a tensor; a bad file is one line (`CheckpointError`).
- `SafeCheckpointIO` is the Trainer's checkpoint I/O: every load is `load_checkpoint`, every save goes to a
  temporary file renamed over the target, so `kill -9` never leaves half a checkpoint.
- `BestCheckpoint` keeps `best.ckpt` (the monitored metric's best epoch); `LastCheckpoint` rewrites
  `last.ckpt` at the end of every training epoch (and every N steps when asked), whatever the monitor did.
  Both store the files they know by name only and, on resume, read them as files of this run's
  `checkpoints/` folder: a moved or copied run directory resumes from its own files, never from a path outside it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmfuse.config import ConfigError
from mmfuse.io import atomic_path

_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")
_SCORE_KEYS = ("best_model_score", "current_score", "kth_value")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read safely (pickled code, truncated, not a checkpoint), as one line."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read with `weights_only=True`: tensors and plain containers only, never code."""
    import pickle
    import zipfile

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as err:  # weights_only refused an object: never load it
        shown = str(err).split("\n")[0][:160]
        raise CheckpointError(f"{path}: refused: it holds pickled objects, not only tensors ({shown})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
        shown = str(err).split("\n")[0][:160]
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {shown}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not an mmfuse checkpoint (no state_dict)")
    bad = next((k for k, v in ckpt["state_dict"].items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        shown = type(ckpt["state_dict"][bad]).__name__
        raise CheckpointError(
            f"{path}: not an mmfuse checkpoint (state_dict[{str(bad)[:80]!r}] is a {shown}, not a tensor)"
        )
    return ckpt


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O: loads through `load_checkpoint`, saves through a temporary file and a rename.

    Args:
        preloaded: {path: checkpoint} already read (and checked) by the run, handed over once instead of re-read.
    """

    def __init__(self, preloaded: dict[str, dict[str, Any]] | None = None) -> None:
        self.preloaded = dict(preloaded or {})

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        ckpt = self.preloaded.pop(str(path), None)
        return ckpt if ckpt is not None else load_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write a temporary file next to `path`, then rename it over `path`: a reader sees the old file or the new."""
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class Restoring(L.Callback):
    """Whether a fit is still restoring its checkpoint: Lightning restores the module, callbacks, loops, optimisers
    and schedulers before the first `on_train_start`, so an error raised before it, on a resume, is the file's."""

    def __init__(self) -> None:
        self.done = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.done = True


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose state names its files relative to its folder and is read back into this run's folder."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["dirpath"] = "."
        for key in _PATH_KEYS:
            state[key] = _name(state[key])
        state["best_k_models"] = {_name(k): v for k, v in state["best_k_models"].items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Every path becomes the file of that name in this run's folder (an absolute path from an older run, too).

        Raises:
            ValueError: a score that is not a tensor (a damaged or foreign checkpoint).
        """
        state = dict(state_dict)
        for key in _SCORE_KEYS:
            if state.get(key) is not None and not isinstance(state[key], torch.Tensor):
                raise ValueError(f"{key} is a {type(state[key]).__name__}, not a tensor")
        best_k = state.get("best_k_models") or {}
        if not isinstance(best_k, dict) or not all(isinstance(v, torch.Tensor) for v in best_k.values()):
            raise ValueError("best_k_models is not a mapping of file names to scores")
        state["dirpath"] = self.dirpath
        for key in _PATH_KEYS:
            state[key] = self._here(state.get(key))
        state["best_k_models"] = {self._here(k): v for k, v in best_k.items() if self._here(k)}
        super().load_state_dict(state)

    def _here(self, path: Any) -> str:
        """The file of `path`'s name in this callback's folder ("" for no path)."""
        name = _name(path)
        return os.path.join(str(self.dirpath), name) if name else ""


def _name(path: Any) -> str:
    """The file name of a path ("" for none, or for a name that is not a plain file name)."""
    name = PurePath(path).name if isinstance(path, str) and path else ""
    return "" if name in ("", ".", "..") else name


class BestCheckpoint(RunCheckpoint):
    """`best.ckpt`: the monitored metric's best epoch. Its state key is Lightning's own (`ModelCheckpoint{...}`),
    so the checkpoints of runs trained before still resume with their best epoch known."""

    @property
    def state_key(self) -> str:
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)


class LastCheckpoint(RunCheckpoint):
    """`last.ckpt` at the end of every training epoch (and every `every_n_train_steps` steps when given).

    Lightning's `save_last` writes only when a top-k checkpoint was saved: with a monitor whose best epoch
    has passed, `last.ckpt` stays at the best epoch and a resume repeats every epoch since.

    A resume from a mid-epoch (step) checkpoint is not exact: the training loader cannot skip the batches
    already seen, so the rest of that epoch reads the epoch's first batches again (`train` warns).

    Args:
        dirpath: the run's `checkpoints/` folder.
        every_n_train_steps: also save every this many optimiser steps (None: at epoch ends only).
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="last",
            monitor=None,
            save_top_k=1,
            every_n_train_steps=every_n_train_steps or None,
            enable_version_counter=False,
            save_on_train_epoch_end=True,
        )

    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        """Every N steps, except at an epoch's last batch: the epoch-end save (after validation) follows it."""
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save, even when a step-triggered save already wrote this step (mid-epoch): this one closes the epoch."""
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
