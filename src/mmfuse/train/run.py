"""`train` and `evaluate`: a whole run, from config to run directory.

A run directory holds `config.yaml` (resolved: the classes of every task included),
`checkpoints/{best,last}.ckpt`, `model.safetensors` (the best weights), `logs/` (CSV and
TensorBoard), `metrics.json`, `report.md` with plots, and `bad_records.txt` when records were skipped.

Every checkpoint is read with `weights_only=True` (`load_checkpoint`, also for Lightning's resume): a
file that carries pickled code is refused with one line, never run. Under DDP every rank evaluates
its shard of the validation and test records (each record once, `train.sharding`) and the metrics are
reduced over ranks, so they equal a single-process evaluation of the same weights.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from mmfuse.builders import (
    TrainOptions,
    build_balancer,
    build_data_model,
    build_run_data,
    build_weighting,
    loader_options,
    run_summary,
    train_options,
)
from mmfuse.config import ConfigError, RunConfig, dump_config, load_config
from mmfuse.io import atomic_path, atomic_write_text
from mmfuse.model import MultiTaskModel
from mmfuse.runs import load_run  # noqa: F401  (re-exported: it moved to mmfuse.runs, which needs no trainer)
from mmfuse.text import one_line
from mmfuse.train.checkpoints import (  # noqa: F401  (CheckpointError, load_checkpoint: re-exported)
    BestCheckpoint,
    CheckpointError,
    LastCheckpoint,
    Restoring,
    SafeCheckpointIO,
    load_checkpoint,
)
from mmfuse.train.data import (
    GROUP_BATCHES_ALL_CACHED,
    Features,
    build_features,
    cached_modalities,
    check_records,
    make_loader,
)
from mmfuse.train.errors import NonFiniteError
from mmfuse.train.history import HistoryCSVLogger, KeepHistory, rows_of
from mmfuse.train.module import MMFuseModule, check_layer_decay
from mmfuse.train.report import write_report
from mmfuse.train.sharding import shard_eval_loader
from mmfuse.train.stopping import check_stopping, drop_unused_state, stop_reason, stopping_callbacks

log = logging.getLogger(__name__)


def monitor_of(monitor: str | None, model: MultiTaskModel) -> tuple[str, str]:
    """The metric that picks the best checkpoint (`monitor`, or the first task's default metric when None), and
    whether higher is better ("max"/"min")."""
    name = monitor
    if name is None:
        task_name, task = next(iter(model.tasks.items()))
        name = f"val/{task_name}/{task.default_metric}"
    parts = name.split("/")
    if len(parts) == 2 and parts[1] == "loss":
        return name, "min"
    if len(parts) != 3 or parts[1] not in model.tasks:
        raise ConfigError(f"train.monitor: {name!r} is not 'val/<task>/<metric>' or 'val/loss'")
    metrics = model.tasks[parts[1]].metrics()
    if parts[2] not in metrics:
        raise ConfigError(f"train.monitor: task {parts[1]!r} has metrics {', '.join(metrics)}, not {parts[2]!r}")
    return name, "max" if metrics[parts[2]].higher_is_better else "min"


class EpochLineProgress(ProgressBar):
    """Progress for logs (stderr not a terminal): one line per training epoch, never a redrawn bar.

    The line goes to the `mmfuse.train.run` logger (the CLI shows it): epoch, the progress-bar metrics
    (training loss, validation headline metrics) and the epoch's wall time.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled, self._t0 = True, 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        took = time.perf_counter() - self._t0
        log.info("epoch %d/%d: %s (%.1f s)", trainer.current_epoch + 1, trainer.max_epochs, shown, took)


def progress_callback() -> ProgressBar:
    """A bar on a terminal and in a Jupyter kernel; one line per epoch when stderr goes to a file or a pipe (CI,
    batch jobs)."""
    in_notebook = "ipykernel" in sys.modules  # Lightning's bar draws with tqdm.auto: a widget in Jupyter
    return TQDMProgressBar(refresh_rate=10) if sys.stderr.isatty() or in_notebook else EpochLineProgress()


def build_trainer(
    t: TrainOptions, run_dir: Path, monitor: str | None, mode: str, resumed: dict[str, Any] | None = None
) -> L.Trainer:
    """The fit trainer; `resumed` is the checkpoint a resumed run continues from (its history is kept).

    `checkpoints/last.ckpt` is written at the end of every epoch (and every `train.checkpoint_every_n_steps`
    steps); with a `monitor`, `checkpoints/best.ckpt` holds its best epoch. Both are saved after the epoch's
    validation and epoch-end hooks, so a resume repeats nothing.

    Across nodes (`t.num_nodes` > 1, `t.devices` processes on each) the processes are started by a launcher
    (torchrun, SLURM's srun, or one command per node with NODE_RANK, MASTER_ADDR and MASTER_PORT set): a launcher
    that started another number of processes than num_nodes x devices, or a multi-node run without any, is refused
    here rather than training on part of the data or waiting forever for a node that never comes.
    """
    ckpts = run_dir / "checkpoints"
    csv_logger = HistoryCSVLogger(run_dir, rows_of(resumed) if resumed else ())
    # Lightning calls 5 hooks of every callback each step (~2 us each): a callback only where it has work to do.
    callbacks: list[Any] = [
        KeepHistory(csv_logger),
        *([Restoring()] if resumed else []),
        *stopping_callbacks(t, monitor, mode),
    ]
    if monitor is not None:  # Lightning runs checkpoint callbacks last, in this order: last.ckpt holds the new best
        callbacks.append(
            BestCheckpoint(
                dirpath=ckpts,
                filename="best",
                monitor=monitor,
                mode=mode,
                save_top_k=1,
                auto_insert_metric_name=False,
                enable_version_counter=False,
                save_on_train_epoch_end=True,
            )
        )
    callbacks.append(LastCheckpoint(ckpts, t.checkpoint_every_n_steps))
    if resumed:
        drop_unused_state(resumed, callbacks)
    if t.progress_bar:
        callbacks.append(progress_callback())
    # On resume, TensorBoard drops the events of the interrupted epoch (those at or after the checkpoint's step).
    tb = TensorBoardLogger(run_dir, name="logs", version="", purge_step=resumed["global_step"] if resumed else None)
    last = str(run_dir / "checkpoints" / "last.ckpt")
    try:
        trainer = L.Trainer(
            **t.trainer_arguments(),
            callbacks=callbacks,
            logger=[csv_logger, tb],
            enable_progress_bar=t.progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=run_dir,
            plugins=[SafeCheckpointIO({last: resumed} if resumed else None)],
        )
        env = getattr(trainer.strategy, "cluster_environment", None)  # None: one process (SingleDeviceStrategy)
        if env is not None and env.creates_processes_externally:
            env.validate_settings(trainer.num_devices, trainer.num_nodes)  # srun's tasks per node = devices
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"train (accelerator={t.accelerator!r}, devices={t.devices!r}, num_nodes={t.num_nodes}, "
            f"strategy={t.strategy!r}, precision={t.precision!r}): {one_line(err)}"
        ) from None
    check_launcher(t, trainer, env)
    if resumed:
        csv_logger.save()  # the CSV now holds exactly the epochs the checkpoint covers
    if t.precision == "16-mixed" and trainer.precision != "16-mixed":
        log.warning(
            "train.precision=16-mixed runs as %s on %s (float16 autocast needs a GPU)",
            trainer.precision,
            trainer.strategy.root_device,
        )
    return trainer


def check_launcher(t: TrainOptions, trainer: L.Trainer, env: Any) -> None:
    """ConfigError (one line) when a launcher started another number of processes than num_nodes x devices, or
    a multi-node run has no launcher (node 0 would wait forever)."""
    processes = trainer.num_nodes * trainer.num_devices
    launcher, count = "", None
    if TorchElasticEnvironment.detect():
        launcher, count = "torchrun's WORLD_SIZE", os.environ.get("WORLD_SIZE")
    elif SLURMEnvironment.detect():
        launcher, count = "SLURM's SLURM_NTASKS", os.environ.get("SLURM_NTASKS")
    if count and int(count) != processes:
        raise ConfigError(
            f"train.num_nodes={t.num_nodes} x train.devices={trainer.num_devices} makes {processes} processes, but "
            f"{launcher} is {count}: make them agree (docs/scale.md, 'Across nodes')"
        )
    unset = [k for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if isinstance(env, LightningEnvironment) and t.num_nodes > 1 and unset:
        raise ConfigError(
            f"train.num_nodes={t.num_nodes}: {', '.join(unset)} not set; start every node with torchrun, srun "
            "(SLURM), or NODE_RANK, MASTER_ADDR and MASTER_PORT set (docs/scale.md, 'Across nodes')"
        )


def check_fusion_batch(model: MultiTaskModel, batch_size: int) -> None:
    """A fusion whose cost grows with the token grid (`check_batch(batch_size, num_tokens)`, e.g. `relation`) is
    checked against its memory bound before any feature is encoded: the token count comes from one forward of a
    placeholder input through the spatial modality's encoder.

    Raises:
        ConfigError: the bound is exceeded (the fusion's one line, naming the keys to change).
    """
    fusion = model.fusion
    spatial = getattr(fusion, "spatial", None)
    if not hasattr(fusion, "check_batch") or spatial not in model.encoders:
        return
    encoder = model.encoders[spatial]
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        tokens = encoder(encoder.collate([encoder.placeholder()])).tokens  # (1, T, D)
    encoder.train(was_training)
    if tokens is None:
        return  # the fusion refuses it with its own line
    try:
        fusion.check_batch(batch_size, tokens.shape[1])
    except ValueError as err:
        raise ConfigError(str(err)) from None


class Run:
    """Everything a run needs, built from a resolved config."""

    def __init__(self, cfg: RunConfig, model: MultiTaskModel | None = None):
        self.timings: dict[str, float] = {}
        self.bad: list[tuple[str, str]] = []
        t0 = time.perf_counter()
        skip_bad = loader_options(cfg).skip_bad
        data = build_run_data(cfg, model.encoders if model is not None else None, self.bad if skip_bad else None)
        self.splits, self.cfg, self.warnings = data.splits, data.cfg, data.warnings
        self.loader_options, self.options = loader_options(self.cfg), train_options(self.cfg)
        self.timings["load_records"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.model = model if model is not None else build_data_model(data)
        # Built here, before any feature is encoded, so that a balancer with nothing to act on is refused at once.
        self.balancer = build_balancer(self.cfg.train.balance, self.model)
        check_layer_decay(self.model, self.options.optim.layer_decay)
        check_fusion_batch(self.model, self.loader_options.batch_size)
        self.timings["build_model"] = time.perf_counter() - t0

    def prepare(self) -> Features:
        t0 = time.perf_counter()
        self.splits, bad = check_records(self.model, self.splits, self.loader_options.skip_bad)
        self.bad += bad
        self.timings["validate_records"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = cached_modalities(self.model, self.loader_options.cache)
        if self.loader_options.group_batches and set(cached) == set(self.model.encoders):
            # the same refusal as make_loader's, before minutes of encoding rather than after
            raise ConfigError(GROUP_BATCHES_ALL_CACHED)
        feats = build_features(self.model, self.splits, cached, self.loader_options.cache_dir)
        self.timings["features"] = time.perf_counter() - t0
        return feats

    def module(self) -> MMFuseModule:
        weighting = build_weighting(self.cfg.train.weighting, self.model.tasks)
        return MMFuseModule(self.model, weighting, self.balancer, **asdict(self.options.optim))


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    ckpts = run_dir / "checkpoints"
    if resume:
        if not (ckpts / "last.ckpt").exists():
            raise ConfigError(f"{run_dir}: nothing to resume (no checkpoints/last.ckpt)")
    elif ckpts.exists() and any(ckpts.iterdir()):
        raise ConfigError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train, keep the best and last checkpoints, evaluate the best on the val and test splits, write the report.

    Without validation records there is no model selection: the last epoch's weights are kept and
    evaluated, and the report says so.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume)
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed = load_checkpoint(last) if resume else None  # checked before anything starts
    L.seed_everything(train_options(cfg).seed, workers=True, verbose=False)
    run = Run(cfg)
    check_stopping(run.options, bool(run.splits.get("val")))  # before the features are encoded
    atomic_write_text(run_dir / "config.yaml", dump_config(run.cfg))
    feats = run.prepare()
    if run.bad:
        atomic_write_text(run_dir / "bad_records.txt", "".join(f"{s}: {r}\n" for s, r in run.bad))
    if "train" not in run.splits or not run.splits["train"]:
        raise ConfigError("data: no training records")
    has_val = bool(run.splits.get("val"))
    if not has_val:
        log.warning("no validation records: no model selection; the last epoch's weights are kept")
    check_stopping(run.options, has_val)
    monitor, mode = monitor_of(run.options.monitor, run.model) if has_val else (None, "min")
    trainer = build_trainer(run.options, run_dir, monitor, mode, resumed)
    # (imported here: the module's import block is shared with other work in progress)
    from mmfuse.train.checkpoints import LoaderResume, stateful_loaders

    world = trainer.world_size
    loaders = {
        s: make_loader(run.model, recs, s, feats, run.loader_options, world > 1)
        for s, recs in run.splits.items()
        if recs
    }
    resumable = bool(stateful_loaders(loaders["train"]))  # a training loader that keeps its position
    if resumable:  # first: a loader state it refuses is the checkpoint's (one line)
        trainer.callbacks.insert(0, LoaderResume())
    if resumed is not None:
        _warn_mid_epoch(resumed, resumable)
    del resumed
    loaders = {s: loader if s == "train" else shard_eval_loader(loader, world) for s, loader in loaders.items()}
    module = run.module()
    if run.options.compile:
        run.model.fusion.compile()
        for head in run.model.heads.values():
            head.compile()
    t0 = time.perf_counter()
    try:
        trainer.fit(
            module, loaders["train"], loaders.get("val"), ckpt_path=str(last) if resume else None, weights_only=True
        )
    except NonFiniteError as err:
        kept = f"the last good checkpoint is kept: {last}" if last.exists() else "no checkpoint had been written yet"
        raise NonFiniteError(f"{err}; {kept}") from None
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
        if not (resume and not next(c for c in trainer.callbacks if isinstance(c, Restoring)).done):
            raise
        # Restoring the checkpoint's state failed (a damaged or foreign file): one line, never a traceback.
        shown = one_line(str(err), 200)  # from the message: a message-less error is named once, by its type
        raise CheckpointError(f"{last}: cannot resume from it: {type(err).__name__}: {shown}") from None
    run.timings["fit"] = time.perf_counter() - t0
    stopped = stop_reason(trainer)
    if stopped != "max_epochs" and trainer.is_global_zero:
        log.info("stopped after epoch %d: %s", trainer.current_epoch, stopped)
    best = best_checkpoint(trainer, run_dir)
    module.load_state_dict(_load_state(str(best), module), strict=True)
    if trainer.is_global_zero:
        export_weights(module.model, run_dir / "model.safetensors")
    t0 = time.perf_counter()
    # Every rank evaluates its shard (each record once) and the metrics are reduced over ranks; nothing of this
    # goes to the training logs.
    trainer.loggers = []
    results = {s: evaluate_module(trainer, module, loaders[s], s) for s in ("val", "test") if s in loaders}
    run.timings["evaluate"] = time.perf_counter() - t0
    run.timings["total"] = time.perf_counter() - start
    summary = {
        "run_dir": str(run_dir),
        "best_checkpoint": str(best.relative_to(run_dir)),
        "monitor": monitor,
        "epochs": trainer.current_epoch,
        "stop_reason": stopped,
        "records": {s: len(r) for s, r in run.splits.items()},
        "bad_records": len(run.bad),
        "warnings": run.warnings,
        "metrics": results,
        "timings_s": {k: round(v, 2) for k, v in run.timings.items()},
        "device": str(trainer.strategy.root_device),
        "precision": str(trainer.precision),
        "world_size": world,
    }
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "metrics.json", json.dumps(summary, indent=2))
        write_report(run_dir, run_summary(run.cfg), summary, run.bad)
    return summary


def _warn_mid_epoch(ckpt: dict[str, Any], resumable: bool) -> None:
    """Say what a resume that starts inside an epoch (a `train.checkpoint_every_n_steps` checkpoint) does with the
    rest of it: a loader that keeps a state (streamed shards, `resumable`) goes on from the checkpoint's position
    (`LoaderResume`); any other loader reads the epoch from its start again."""
    from mmfuse.train.checkpoints import loader_states

    try:
        done = int(ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"])
        finished = bool(ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"])
    except (KeyError, TypeError, ValueError):
        return
    if not done or finished:
        return
    if resumable and loader_states(ckpt):
        log.info(
            "resuming inside epoch %s after %d of its batches: the streaming loader goes on from the checkpoint's "
            "position (no record of that epoch read twice or skipped)",
            ckpt.get("epoch"),
            done,
        )
        return
    log.warning(
        "resuming inside epoch %s after %d of its batches: the rest of that epoch reads the epoch's first "
        "batches again (the loader cannot skip ahead), so the run will differ from an uninterrupted one",
        ckpt.get("epoch"),
        done,
    )


def best_checkpoint(trainer: L.Trainer, run_dir: Path) -> Path:
    """The checkpoint whose weights the run keeps: the monitor's best, else `last.ckpt`; always in `run_dir`."""
    found = next((c.best_model_path for c in trainer.callbacks if isinstance(c, BestCheckpoint)), "")
    name = Path(found).name if found else "last.ckpt"
    return run_dir / "checkpoints" / name


def _load_state(path: str, module: MMFuseModule) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)
    try:
        module.on_load_checkpoint(ckpt)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return ckpt["state_dict"]


def evaluate_module(trainer: L.Trainer, module: MMFuseModule, loader: Any, split: str) -> dict[str, dict[str, float]]:
    """Per-task metrics of `module` on one loader: {task: {metric: value}}."""
    out = (
        trainer.test(module, loader, verbose=False)[0]
        if split == "test"
        else trainer.validate(module, loader, verbose=False)[0]
    )
    table: dict[str, dict[str, float]] = {}
    for key, value in out.items():
        parts = key.split("/")
        if len(parts) == 3:
            table.setdefault(parts[1], {})[parts[2]] = float(value)
    order = [*module.model.tasks, *sorted(set(table) - set(module.model.tasks))]  # the config's task order
    return {name: dict(sorted(table[name].items())) for name in order if name in table}


def export_weights(model: MultiTaskModel, path: Path) -> None:
    """The model's weights as safetensors, frozen encoders left out (they are named in the config)."""
    from safetensors.torch import save_file

    rebuilt = {m: e for m, e in model.encoders.items() if e.rebuilt_from_config}
    frozen = tuple(f"encoders.{m}." for m in rebuilt)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(frozen)}
    meta = {f"frozen.{m}": e.cache_key() for m, e in rebuilt.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def only_split(run: Run, run_dir: Path, split: str) -> None:
    """Keep only `split` of the run's data.

    Raises:
        ConfigError: the data has no such split, or it is empty.
    """
    if not run.splits.get(split):
        raise ConfigError(f"{run_dir}: the data has no {split!r} split (splits: {', '.join(run.splits)})")
    run.splits = {split: run.splits[split]}


def eval_trainer(accelerator: str) -> L.Trainer:
    """A Trainer that only evaluates: one device, no logger, progress bar, summary or checkpoints."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def evaluate(
    run_dir: str | Path, split: str = "test", overrides: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Metrics of a finished run on one split of its own data (or of `--set data.*` overrides)."""
    run_dir = Path(run_dir)
    model = load_run(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    run = Run(cfg, model)
    only_split(run, run_dir, split)
    feats = run.prepare()
    loader = make_loader(model, run.splits[split], split, feats, run.loader_options)
    trainer = eval_trainer(run.options.accelerator)
    module = run.module()
    return evaluate_module(trainer, module, loader, split if split == "test" else "val")
