"""A run's checkpoints: read safely, written atomically, and named relative to the run directory.

- `load_checkpoint` reads with `weights_only=True` (tensors and plain containers, never code) and checks
  that every weight is a tensor; a bad file is one line (`CheckpointError`).
- `SafeCheckpointIO` is the Trainer's checkpoint I/O: every load is `load_checkpoint`, every save goes to a
  temporary file renamed over the target, so `kill -9` never leaves half a checkpoint.
- `BestCheckpoint` keeps `best.ckpt` (the monitored metric's best epoch); `LastCheckpoint` rewrites
  `last.ckpt` at the end of every training epoch (and every N steps when asked), whatever the monitor did.
  Both store the files they know by name only and, on resume, read them as files of this run's
  `checkpoints/` folder: a moved or copied run directory resumes from its own files, never from a path outside it.
- `LoaderResume` puts a resumable training loader (LitData's `StreamingDataLoader`) back at the checkpoint's position.
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

    A resume from a mid-epoch (step) checkpoint goes on from the loader's saved position when the loader keeps one
    (streamed shards, `LoaderResume`: each record of that epoch once); a records loader cannot skip the batches
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


def loader_states(ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    """The training loaders' states a checkpoint holds (Lightning saves `state_dict()` of each loader that has one,
    under `loops.fit_loop.state_dict.combined_loader`); [] when none."""
    try:
        states = ckpt["loops"]["fit_loop"]["state_dict"].get("combined_loader") or []
    except (KeyError, TypeError, AttributeError):
        return []
    return states if isinstance(states, list) and all(isinstance(s, dict) for s in states) else []


def stateful_loaders(loader: Any) -> list[Any]:
    """The loaders in `loader` (one, or a list/dict of them, as `trainer.train_dataloader` gives) that keep a state
    (`state_dict` and `load_state_dict`, Lightning's test for what it saves)."""
    found = loader.values() if isinstance(loader, dict) else loader if isinstance(loader, (list, tuple)) else [loader]
    return [dl for dl in found if all(callable(getattr(dl, f, None)) for f in ("state_dict", "load_state_dict"))]


class LoaderResume(L.Callback):
    """On resume, hands each stateful training loader its state from the checkpoint before the first batch is read.

    Lightning saves the state of a loader that has `state_dict`/`load_state_dict` in every checkpoint, but loads it
    back only when it builds the loader after restoring its loops, and only inside an epoch. Here neither holds:
    `configure_optimizers` reads `trainer.estimated_stepping_batches` (the schedule's length), which builds the loader
    before the loops are restored, so the state was dropped without a word and a mid-epoch resume read the epoch from
    its start; and after an epoch-end checkpoint LitData's epoch count started again, so the next epoch replayed the
    first epoch's order. Loading the same state twice is harmless, so this stays right if Lightning restores it too.

    Runs before `Restoring` sees the training start: a state the loader refuses is the checkpoint's error (one line).
    """

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.states = loader_states(checkpoint)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self.states = self.states, []
        loaders = stateful_loaders(trainer.train_dataloader)
        if not states or not loaders:  # a loader without a state (records) restarts its epoch: `train` warns
            return
        if len(loaders) != len(states):
            raise ValueError(f"it holds the state of {len(states)} training loader(s), this run has {len(loaders)}")
        for loader, state in zip(loaders, states):
            loader.load_state_dict(state)
