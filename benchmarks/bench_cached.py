"""The frozen path against its honest baseline: a bare PyTorch loop over the same cached feature tensors.

Both sides train the built-in easy-VQA model's fusion + heads (the same modules, deep-copied from one
initialisation) on the cached features of the frozen encoders, with the same batch size, fused AdamW,
learning-rate schedule (warm-up + cosine), gradient clipping and equal task weighting.

- bare: the split's cached features gathered once into contiguous (N, D) tensors; each step indexes a
  shuffled batch, runs fusion + heads, sums the masked per-task losses, backward, clip, step.
- mmfuse: `Run.prepare()` + `make_loader` + `Run.module()` + `build_trainer` (checkpoints, CSV and
  TensorBoard loggers, the non-finite check), one `fit` epoch per round; the figure is the training epoch
  alone (on_train_epoch_start to on_train_epoch_end, validation and checkpoint left out).

Rounds alternate the two sides (the order rotates) so load bursts on a shared machine hit both; the
figures are medians over rounds with the per-round range. Run from the repository root:

    PYTHONPATH=src python benchmarks/bench_cached.py --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from mmfuse.builders import train_options  # noqa: E402
from mmfuse.config import load_config  # noqa: E402
from mmfuse.train.data import make_loader  # noqa: E402
from mmfuse.train.run import Run, build_trainer, monitor_of  # noqa: E402


class EpochTimer(L.Callback):
    """Wall time of each training epoch (no validation, no checkpoint)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._t0)


def lr_factor(warm: int, total: int):
    """mmfuse's schedule: linear warm-up, then cosine to zero over the remaining steps."""

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def bare_optimizer(cfg, params: list[torch.nn.Parameter], total_steps: int):
    """The bare loop's fused AdamW and mmfuse's schedule (warm-up + cosine) over `params`."""
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.train.warmup_steps, total_steps))


def bare_loss(model, logits: dict, labels: dict, masks: dict) -> torch.Tensor:
    """The sum of the tasks' losses over their labelled rows (equal weighting)."""
    return sum(model.tasks[t].loss(logits[t][masks[t]], labels[t][masks[t]]) for t in labels)


def bare_epoch(
    run: Run, feats: dict[str, torch.Tensor], labels, masks, epoch: int, total_steps: int
) -> tuple[float, float]:
    """One epoch of the bare loop on a fresh copy of the model's fusion + heads; returns wall and CPU seconds."""
    cfg = run.cfg
    model = copy.deepcopy(run.model)
    model.train()
    params = model.trainable_parameters("head")
    opt, sched = bare_optimizer(cfg, params, total_steps)
    from mmfuse.encoders.base import EncoderOutput

    n, bs = len(next(iter(masks.values()))), cfg.data.batch_size
    t0, c0 = time.perf_counter(), time.process_time()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
    for idx in order.split(bs):
        out = model({}, {m: EncoderOutput(f[idx]) for m, f in feats.items()}, None)
        loss = bare_loss(
            model, out.logits, {t: v[idx] for t, v in labels.items()}, {t: v[idx] for t, v in masks.items()}
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"), foreach=True)
        opt.step()
        sched.step()
    return time.perf_counter() - t0, time.process_time() - c0


class BareStepModule(L.LightningModule):
    """The bare loop's step as a LightningModule (manual optimisation, as mmfuse's): the cost of Lightning's loop
    and hooks, mmfuse's Trainer (callbacks, loggers) and loader, without anything of mmfuse's module.

    Args:
        model: a fresh copy of the model (its fusion + heads train).
        cfg: the run config (lr, weight decay, warm-up, clipping).
        total_steps: the schedule's length.
    """

    def __init__(self, model: torch.nn.Module, cfg, total_steps: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model, self.cfg, self.total_steps = model, cfg, total_steps
        self.params = model.trainable_parameters("head")

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        out = self.model({}, batch["features"], None)
        loss = bare_loss(self.model, out.logits, batch["labels"], batch["masks"])
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip or float("inf"), foreach=True)
        opt.step()
        sched.step()

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        return batch if device.type == "cpu" else super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_optimizers(self) -> dict:
        opt, sched = bare_optimizer(self.cfg, self.params, self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def mmfuse_epoch(run: Run, loaders: dict, workdir: Path, r: int) -> float:
    """One `fit` epoch of mmfuse (its own trainer and module); returns the training epoch's seconds."""
    cfg = copy.deepcopy(run.cfg)
    cfg.train.max_epochs, cfg.train.progress_bar = 1, False
    monitor, mode = monitor_of(cfg.train.monitor, run.model)
    trainer = build_trainer(train_options(cfg), workdir / f"round{r}", monitor, mode)
    timer = EpochTimer()
    trainer.callbacks.append(timer)
    saved = copy.deepcopy(run.model.state_dict())
    trainer.fit(run.module(), loaders["train"], loaders["val"])
    run.model.load_state_dict(saved)
    return timer.times[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="config override (as mmfuse train --set)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    cfg = load_config(None, ["train.progress_bar=false", *args.set])
    run = Run(cfg)
    features = run.prepare()
    loaders = {s: make_loader(run.model, recs, s, features, run.loader_options) for s, recs in run.splits.items()}
    # The bare loop's tensors: each training record's cached features gathered once, labels collated once.
    train_rows = loaders["train"].dataset
    feats = {m: t.gather(features.rows["train"][m]).pooled.contiguous() for m, t in features.tables.items()}
    labels, masks = train_rows.labels, train_rows.masks
    n = len(run.splits["train"])
    total_steps = cfg.train.max_epochs * loaders["train"].steps  # optimiser steps (its len counts lists of them)
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            sides = [("bare", bare), ("mmfuse", ours)]
            for name, out in sides[r % 2 :] + sides[: r % 2]:
                if name == "bare":
                    out.append(bare_epoch(run, feats, labels, masks, r, total_steps)[0])
                else:
                    out.append(mmfuse_epoch(run, loaders, Path(tmp), r))
    ratios = [n / o / (n / b) for b, o in zip(bare, ours)]
    result = {
        "records_per_epoch": n,
        "batch_size": cfg.data.batch_size,
        "bare_samples_per_s": {"median": n / statistics.median(bare), "range": [n / max(bare), n / min(bare)]},
        "mmfuse_samples_per_s": {"median": n / statistics.median(ours), "range": [n / max(ours), n / min(ours)]},
        "mmfuse_over_bare": {"median": statistics.median(ratios), "range": [min(ratios), max(ratios)]},
        "rounds": args.rounds,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
