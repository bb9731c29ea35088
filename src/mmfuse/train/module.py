"""A thin LightningModule around MultiTaskModel: losses, weighting, balancing, metrics, optimiser.

Manual optimisation, so that gradient-based task weightings (PCGrad, GradNorm, ...) and modality
balancing (OGM-GE scales encoder gradients between backward and step) fit in one place. Under
DDP every step still makes exactly one backward call, so gradients are synchronised once.

Scale-out rules kept here:
- Every rank runs the same collectives in the same order whatever its shard holds: the labelled
  counts of the evaluation epoch are summed over ranks once, and a task's metrics are computed (a
  collective) on every rank exactly when some rank saw a label of it.
- Evaluation batches may carry `pad` (B,) bool: rows that only even out DDP shards; they are never counted.
- Gradients are clipped here, after unscaling, so fused AdamW works with 16-mixed and bf16-mixed.
- A non-finite loss or gradient norm stops training at the step where it appears (`NonFiniteError`),
  before the optimiser step; under DDP the flags are summed over ranks so all ranks stop together.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn
from torchmetrics.utilities.distributed import gather_all_tensors

from mmfuse.config import ConfigError
from mmfuse.data.collate import merge_absent
from mmfuse.encoders.base import Encoder
from mmfuse.model import ModelOutput, MultiTaskModel
from mmfuse.mtl.base import Weighting
from mmfuse.train.errors import NonFiniteError
from mmfuse.train.schedule import lr_scheduler, upgrade_state

log = logging.getLogger(__name__)


class MMFuseModule(L.LightningModule):
    """Args:
    model: the multi-task model.
    weighting: a `mmfuse.mtl` Weighting (turns per-task losses into one backward pass).
    balancer: an optional `mmfuse.balance` Balancer.
    lr / encoder_lr: learning rates of fusion + heads and of unfrozen encoders.
    layer_decay: layer-wise lr decay of encoders (1.0: off): the block at depth k from the top gets
        `encoder_lr * layer_decay**k` (`encoder_param_groups`).
    optimizer: "adamw" or "sgd" (with `momentum`, as in the OGM-GE paper).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        weighting: nn.Module,
        balancer: nn.Module | None = None,
        lr: float = 1e-3,
        encoder_lr: float = 1e-5,
        layer_decay: float = 1.0,
        weight_decay: float = 0.01,
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        grad_clip: float | None = 1.0,
        seed: int = 0,
        optimizer: str = "adamw",
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model, self.weighting, self.balancer = model, weighting, balancer
        self.hp = dict(
            lr=lr,
            encoder_lr=encoder_lr,
            layer_decay=layer_decay,
            weight_decay=weight_decay,
            scheduler=scheduler,
            warmup_steps=warmup_steps,
            grad_clip=grad_clip,
            optimizer=optimizer,
            momentum=momentum,
        )
        self.seed = seed
        self.metrics = nn.ModuleDict(
            {split: nn.ModuleDict({n: t.metrics() for n, t in model.tasks.items()}) for split in ("val", "test")}
        )
        # Per-modality ("unimodal") accuracy of the balancer's scored task, when a balancer is used.
        self.unimodal_task = (balancer.task or balancer.probe_task) if balancer is not None else None
        if self.unimodal_task is not None and not model.tasks[self.unimodal_task].scores_classes:
            self.unimodal_task = None
        self.unimodal = nn.ModuleDict()
        if self.unimodal_task is not None:
            task = model.tasks[self.unimodal_task]
            self.unimodal = nn.ModuleDict(
                {f"{split}_{m}": task.metrics()["accuracy"] for split in ("val", "test") for m in model.modalities}
            )
        # Per task, the sum of the step losses and the count of steps with labels: (2, T) float64 on an accelerator
        # (no host sync per step), two lists of Python floats on the CPU (where reading a value costs nothing).
        self._epoch_losses: torch.Tensor | list[list[float]] | None = None
        self._sums_epoch_losses = _reads_epoch_losses(weighting)  # else no step adds to them: nothing reads them
        self._balance_logs: dict[str, list[float]] = defaultdict(list)
        for metric in self.modules():  # they only ever see rows already gathered from every rank (_eval_epoch_end)
            if isinstance(metric, torchmetrics.Metric):
                metric.distributed_available_fn = _local_only
        # split -> {task or "unimodal/<modality>": [(preds, target) per batch]}, and (T, 2) loss sums and counts.
        self._rows: dict[str, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._step_losses: torch.Tensor | None = None  # (T,) float32 this step's task losses, checked before the step
        self._step_values: torch.Tensor | None = None  # (T,) the same in their own dtype, and the weights (T,): logged
        self._step_weights: torch.Tensor | None = None
        # The weighting stacks the losses in its own task order; the module keeps the model's.
        order = [list(weighting.tasks).index(t) for t in model.tasks] if hasattr(weighting, "tasks") else None
        self._task_order = None if order is None or order == sorted(order) else torch.tensor(order)
        self._batch_idx = 0  # this step's index in the epoch (the non-finite message)
        self._shared: list[nn.Parameter] | None = None

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any], absent: dict[str, torch.Tensor] | None = None) -> ModelOutput:
        merged = merge_absent(batch.get("absent"), absent)
        return self.model(batch.get("inputs", {}), batch.get("features"), merged or None)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters shared by all tasks: unfrozen encoders and the fusion.

        Computed once (walking a frozen backbone's parameters every step cost 4% of a cached-feature step);
        `requires_grad` does not change during training.
        """
        if self._shared is None:
            parts = (self.model.encoders, self.model.fusion)
            self._shared = [p for m in parts for p in m.parameters() if p.requires_grad]
        return self._shared

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """On the CPU the batch is already where it belongs: skip Lightning's walk over it (5% of a cached step)."""
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any] | list[dict[str, Any]], batch_idx: int) -> None:
        """One optimiser step; for a list of batches (`CachedBatches` with `steps_per_call` k), one for each in turn,
        each step's log row written as it is taken (the last one's by `on_train_batch_end`, as for a single batch)."""
        if not isinstance(batch, list):
            self._train_step(batch, batch_idx)
            return
        k = self.trainer.train_dataloader.steps_per_call  # every list of an epoch but the last holds k batches
        for j, one in enumerate(batch):
            if j:  # the previous step's row, at the point `on_train_batch_end` writes a single batch's
                self._log_step_row(len(batch[j - 1]["index"]), progress_bar=False)
            self._train_step(one, batch_idx * k + j)
        # Lightning counts this call as one batch stepped (+1 after it): the step of the rows it logs (validation
        # metrics) and of a resume. Counted as the optimiser steps taken, they are those of one batch a call.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped += len(batch) - 1

    def _train_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        self._batch_idx, balancer = batch_idx, self.balancer
        absent = None
        if balancer is not None:
            absent = balancer.absent(len(batch["index"]), batch["index"].device, True, missing=batch.get("absent"))
        out = self(batch, absent)
        losses = self.model.losses(out.logits, batch["labels"], batch["masks"])
        extra = balancer.aux_loss(out, batch["labels"], batch["masks"]) if balancer is not None else None
        opt.zero_grad(set_to_none=True)
        stacked, self._step_weights = self.weighting.backward_tensors(
            losses, self.shared_parameters(), backward=self.manual_backward, extra_loss=extra
        )
        if self._task_order is not None:
            stacked, self._step_weights = stacked[self._task_order], self._step_weights[self._task_order]
        self._step_losses = stacked.float()  # (T,) read by the non-finite check and the epoch means
        if balancer is None:
            opt.step()  # -> on_before_optimizer_step: unscale, clip, non-finite check
        else:
            for k, v in balancer.modulate(self.model, out, batch["labels"], batch["masks"], self.current_epoch).items():
                self._balance_logs[k].append(float(v))
            with self._balanced_lr(opt):
                opt.step()
        sched.step()
        self._step_values = stacked  # (T,) in the losses' dtype, for the step's log row
        if self._sums_epoch_losses:
            self._add_epoch_losses(batch["masks"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every `log_every_n_steps` steps (and on a stop): the step's losses and weights, in one row per logger.

        Written to the loggers directly, as Lightning would write `self.log(..., on_step=True)` values (the same
        keys, `epoch` added, Lightning's step number, `save()` after each), at the same point (after the callbacks'
        `on_train_batch_end`, so a checkpoint saved at this step does not hold its row): each `self.log` key costs
        ~0.25 ms in Lightning's result collection (2.6), which was 1 to 9 keys per logged step. Only the progress
        bar's `train/loss` goes through `self.log`, and only when there is a progress bar.
        """
        last = batch[-1] if isinstance(batch, list) else batch
        self._log_step_row(len(last["index"]))

    def _log_step_row(self, batch_size: int, progress_bar: bool = True) -> None:
        """The last step's row, when this step is one Lightning writes; the progress bar's value only from
        `on_train_batch_end` (one `self.log` per Lightning step)."""
        if self._step_values is None or not self._logs_this_step():
            return
        weights = dict(zip(self.model.tasks, self._step_weights.cpu().tolist()))
        values = dict(zip(self.model.tasks, self._step_values))  # {task: 0-dim loss}, in the model's order
        total = sum(weights.get(t, 1.0) * loss for t, loss in values.items())
        if progress_bar and self.trainer.progress_bar_callback is not None:
            self.log("train/loss", total, prog_bar=True, logger=False, batch_size=batch_size)
        if not self.loggers:
            return
        # As `self.log` would: the weights (Python floats) become tensors of the default dtype (at least float32),
        # then numbers again.
        dtype = torch.promote_types(torch.get_default_dtype(), torch.float32)
        row = {"train/loss": total.item()}
        row.update({f"train/{t}/loss": loss.item() for t, loss in values.items()})
        row.update({f"train/weight/{t}": torch.tensor(w, dtype=dtype).item() for t, w in weights.items()})
        row["epoch"] = self.current_epoch
        step = self.global_step - 1  # Lightning's step of this row: the batches stepped before this one
        for logger in self.loggers:
            logger.log_metrics(dict(row), step=step)
            logger.save()

    def _add_epoch_losses(self, masks: dict[str, torch.Tensor]) -> None:
        """Sum each task's step loss (steps where it has labels), in float64: on an accelerator on the device (no
        host sync per step); on the CPU in Python (the same sums, in 4 small ops instead of 8)."""
        losses = self._step_losses
        labelled = torch.stack([masks[t] for t in self.model.tasks]).any(dim=1)  # (T,)
        if losses.device.type == "cpu" and labelled.device.type == "cpu":
            if self._epoch_losses is None:
                self._epoch_losses = [[0.0] * len(losses), [0.0] * len(losses)]
            sums, steps = self._epoch_losses
            for i, (loss, has) in enumerate(zip(losses.tolist(), labelled.tolist())):
                if has:
                    sums[i] += loss
                    steps[i] += 1.0
            return
        labelled = labelled.to(losses.device)
        if self._epoch_losses is None:
            self._epoch_losses = torch.zeros(2, len(labelled), dtype=torch.float64, device=losses.device)
        self._epoch_losses[0].add_(torch.where(labelled, losses, 0.0))  # float32 -> float64 exactly
        self._epoch_losses[1].add_(labelled)

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this step's logged values: every `log_every_n_steps` optimiser steps (counted
        after this step's `opt.step()`: one per batch), and on a stop."""
        every = self.trainer.log_every_n_steps
        if not every:
            return False
        return self.global_step % every == 0 or self.trainer.should_stop

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale (16-mixed), clip, and stop on a non-finite loss or gradient norm, before the step is taken."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Lightning leaves unscaling to fused optimisers; clipping needs unscaled gradients first.
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        self._check_finite(norm, grad_checked=scaler is None)  # before clipping, which would zero the evidence
        if self.hp["grad_clip"]:
            torch.nn.utils.clip_grads_with_norm_(params, self.hp["grad_clip"], norm, foreach=True)

    def _check_finite(self, grad_norm: torch.Tensor, grad_checked: bool) -> None:
        """One host sync per step. With a GradScaler (16-mixed) an overflowing gradient is the scaler's to skip."""
        losses = self._step_losses
        if losses is None:
            return
        single = self.trainer.world_size == 1
        if single and losses.device.type == "cpu" and grad_norm.device.type == "cpu":  # reading values is free
            if all(map(math.isfinite, losses.tolist())) and (not grad_checked or math.isfinite(grad_norm.item())):
                return
        elif single and grad_norm.device == losses.device:  # the common case in 3 small ops: all finite?
            checked = torch.cat([losses, grad_norm.reshape(1)]) if grad_checked else losses
            if bool(torch.isfinite(checked).all()):
                return
        grad_bad = ~torch.isfinite(grad_norm.float()).reshape(1).to(losses.device)
        if not grad_checked:
            grad_bad = torch.zeros_like(grad_bad)
        bad = torch.cat([~torch.isfinite(losses), grad_bad])
        if not single:  # identical on every rank, so all ranks stop together
            bad = self.trainer.strategy.reduce(bad.float(), reduce_op="sum")
        if bool(bad.any()):
            raise NonFiniteError(self._non_finite_message(bad.cpu().tolist(), grad_norm))

    def _non_finite_message(self, bad: list[float], grad_norm: torch.Tensor) -> str:
        names = list(self.model.tasks)
        tasks = [n for n, b in zip(names, bad) if b]
        where = f"epoch {self.current_epoch}, step {self._batch_idx} (global step {self.global_step})"
        if tasks:
            shown = ", ".join(f"{n!r}" for n in tasks)
            return f"non-finite loss at {where} in task {shown}; training stopped before the weights were updated"
        norms = {n: _grad_norm64(h) for n, h in self.model.heads.items()}  # float64: no overflow of its own
        broken = [n for n, v in norms.items() if not math.isfinite(v)]
        if broken:
            shown = "task " + ", ".join(f"{n!r}" for n in broken)
        else:  # every gradient is finite but their norm overflows float32: name the largest
            top = max(norms, key=norms.__getitem__)
            shown = f"task {top!r} (its head's gradient norm {norms[top]:.3g} is the largest)"
        return (
            f"non-finite gradient norm ({float(grad_norm):g}) at {where}, from {shown}; "
            "training stopped before the weights were updated"
        )

    def on_train_epoch_start(self) -> None:
        # Re-seed per epoch (and rank) so that a run resumed from an epoch's checkpoint draws the same
        # dropout and balancing noise as the uninterrupted run.
        L.seed_everything(self.seed + 1000 * self.current_epoch + self.global_rank, workers=True, verbose=False)

    def on_train_epoch_end(self) -> None:
        means = {}
        if self._epoch_losses is not None:  # one host sync per epoch
            acc = self._epoch_losses
            sums, steps = acc.cpu().tolist() if isinstance(acc, torch.Tensor) else acc
            means = {t: s / k for t, s, k in zip(self.model.tasks, sums, steps) if k}
        on_end = getattr(self.weighting, "on_epoch_end", None)
        if on_end is not None:
            on_end(self.current_epoch, means)
        if self._balance_logs:
            # Straight to the loggers: metrics logged with self.log here reach them only after this epoch's
            # checkpoint is written, so a resumed run would lose them.
            row = {f"balance/{k}": sum(v) / len(v) for k, v in self._balance_logs.items()}
            for logger in self.loggers:
                logger.log_metrics({**row, "epoch": self.current_epoch}, step=self.global_step)
        self._epoch_losses = None
        self._balance_logs.clear()

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        """Keep this rank's labelled rows (never the DDP padding); metrics are computed at the epoch's end."""
        out = self(batch)
        real = ~batch["pad"] if "pad" in batch else None  # (B,) rows that are not DDP padding
        rows = self._rows.setdefault(split, defaultdict(list))
        sums = self._loss_sums.setdefault(split, torch.zeros(len(self.model.tasks), 2, device=self.device))
        for i, (name, task) in enumerate(self.model.tasks.items()):
            mask = batch["masks"][name] if real is None else batch["masks"][name] & real
            logits, target = out.logits[name][mask], batch["labels"][name][mask]
            rows[name].append(task.metric_input(logits.detach(), target))  # also when empty: shapes and dtypes
            n = int(mask.sum())
            if n:
                sums[i, 0] += task.loss(logits, target).float() * n
                sums[i, 1] += n
        if self.unimodal_task is not None:
            name = self.unimodal_task
            mask = batch["masks"][name] if real is None else batch["masks"][name] & real
            task = self.model.tasks[name]
            for m, logits in self.balancer.unimodal_logits(self.model, out, name).items():
                rows[f"unimodal/{m}"].append(task.metric_input(logits[mask].detach(), batch["labels"][name][mask]))

    def _gathered(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (preds, target) rows, concatenated with every other rank's (the same on every rank)."""
        preds, target = torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])
        if self.trainer.world_size > 1:
            preds, target = torch.cat(gather_all_tensors(preds)), torch.cat(gather_all_tensors(target))
        return preds, target

    def _eval_epoch_end(self, split: str) -> None:
        """Gather every task's rows from every rank (the same collectives, in the same order, on every rank,
        whatever a rank's shard holds), then compute the metrics of the tasks with at least one labelled row."""
        rows = self._rows.pop(split, {})
        sums = self._loss_sums.pop(split, torch.zeros(len(self.model.tasks), 2, device=self.device))
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        values: dict[str, torch.Tensor] = {}
        for name in self.model.tasks if rows else ():  # rows: every rank ran the same number of batches (>= 1)
            for k, v in self._compute(self.metrics[split][name], *self._gathered(rows[name])).items():
                values[f"{split}/{name}/{k}"] = v
        for m in self.model.modalities if rows and self.unimodal_task is not None else ():
            for v in self._compute(self.unimodal[f"{split}_{m}"], *self._gathered(rows[f"unimodal/{m}"])).values():
                values[f"{split}/unimodal/{m}_accuracy"] = v
        labelled = sums[:, 1] > 0
        if bool(labelled.any()):  # the sum over tasks of each task's mean loss over its labelled rows
            values[f"{split}/loss"] = (sums[labelled, 0] / sums[labelled, 1]).sum()
        # Every value is computed from the rows of all ranks, identically on each: log it as it is.
        headline = {k: v for k, v in values.items() if k.split("/")[-1] in self._headline_metrics()}
        self.log_dict({k: v for k, v in values.items() if k not in headline})
        self.log_dict(headline, prog_bar=split == "val")

    @staticmethod
    def _compute(metric: torchmetrics.Metric, preds: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: value} of a metric collection ({"value": v} of a single metric) on all rows; {} without rows."""
        if not len(target):
            return {}
        metric.update(preds, target)
        out = metric.compute()
        metric.reset()
        return dict(out) if isinstance(out, dict) else {"value": out}

    def _headline_metrics(self) -> set[str]:
        """The metrics shown in the progress bar: each task's default one."""
        return {t.default_metric for t in self.model.tasks.values()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hp
        opt = self._optimizer()
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps = getattr(self.trainer.train_dataloader, "steps", None)  # CachedBatches: its batches, not its lists
        if steps is not None and steps != len(self.trainer.train_dataloader):
            total = max(1, steps * self.trainer.max_epochs)
        sched = lr_scheduler(opt, hp["scheduler"], hp["warmup_steps"], total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _optimizer(self) -> torch.optim.Optimizer:
        """SGD with momentum or AdamW over `_param_groups()`."""
        hp, groups = self.hp, self._param_groups()
        if hp["optimizer"] == "sgd":
            return torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        # The fused kernel updates every tensor in one pass: 4x faster than the default on a 34M-parameter
        # model on 2 CPU threads (benchmarks/, finetune). It needs floating-point parameters on CPU or CUDA.
        params = [p for g in groups for p in g["params"]]
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(groups, lr=hp["lr"], weight_decay=hp["weight_decay"], fused=fused)

    def _param_groups(self) -> list[dict[str, Any]]:
        """Fusion + heads (lr), then per modality its own fusion parameters (lr) and its unfrozen encoder
        (encoder_lr, one group per block depth with `layer_decay`), each group tagged with `"modality"` so a
        balancer can scale its learning rate per step, then the weighting's and balancer's own parameters (lr, no
        weight decay). Empty groups are left out."""
        from mmfuse.balance import modality_parameters

        hp, fusion = self.hp, self.model.fusion
        owned = {m: {id(p) for p in fusion.modality_parameters(m)} for m in self.model.modalities}
        taken = set().union(*owned.values())
        shared = [p for p in self.model.trainable_parameters("head") if id(p) not in taken]
        groups: list[dict[str, Any]] = [{"params": shared, "lr": hp["lr"]}]
        for m in self.model.modalities:
            own = [p for p in modality_parameters(self.model, m) if id(p) in owned[m]]
            groups += [{"params": own, "lr": hp["lr"], "modality": m}]
            enc = encoder_param_groups(self.model.encoders[m], hp["encoder_lr"], hp["layer_decay"])
            groups += [{**g, "modality": m} for g in enc]
            if len(enc) > 1:
                log.info("%s encoder: lr %s", m, ", ".join(f"{g['lr']:.3g} at depth {g['depth']}" for g in enc))
        extra = [p for m in (self.weighting, self.balancer) if m is not None for p in m.parameters() if p.requires_grad]
        groups.append({"params": extra, "lr": hp["lr"], "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    @contextlib.contextmanager
    def _balanced_lr(self, optimizer: Any) -> Iterator[None]:
        """For one optimiser step, multiply the lr of each modality's groups by the balancer's `lr_scale[m]`."""
        scale = self.balancer.lr_scale if self.balancer is not None else {}
        changed = [(g, g["lr"]) for g in optimizer.param_groups if scale.get(g.get("modality"), 1.0) != 1.0]
        for g, lr in changed:
            g["lr"] = lr * scale[g["modality"]]
        try:
            yield
        finally:
            for g, lr in changed:
                g["lr"] = lr

    # ------------------------------------------------------------------ checkpoints
    def _frozen_prefixes(self) -> dict[str, str]:
        return {f"model.encoders.{m}.": e.cache_key() for m, e in self.model.encoders.items() if e.rebuilt_from_config}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen encoders loaded from files are rebuilt from the config (cache_key names their weights): leave them out.
        # Trainable parameters only: frozen ones cannot have changed (walking a frozen backbone cost 8% of an epoch).
        finite = [torch.isfinite(p).all() for p in self.parameters() if p.requires_grad and p.is_floating_point()]
        if finite and not bool(torch.stack(finite).all()):
            raise NonFiniteError(f"non-finite weights at epoch {self.current_epoch}: the checkpoint was not written")
        prefixes = self._frozen_prefixes()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(tuple(prefixes))]:
            del state[key]
        checkpoint["mmfuse_frozen"] = prefixes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("lr_schedulers"):  # a run written when the schedule was one LambdaLR
            kind, warm = self.hp["scheduler"], self.hp["warmup_steps"]
            checkpoint["lr_schedulers"] = [upgrade_state(s, kind, warm) for s in checkpoint["lr_schedulers"]]
        saved = checkpoint.get("mmfuse_frozen", {})
        current = self._frozen_prefixes()
        for prefix, key in saved.items():
            if current.get(prefix) != key:
                raise ValueError(f"checkpoint was trained with a different frozen encoder at {prefix.rstrip('.')}")
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith(tuple(saved)) and key not in state:
                state[key] = value


def encoder_param_groups(encoder: Encoder, lr: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """The optimiser groups of an encoder's trainable parameters, top block first.

    With `layer_decay` < 1 (BEiT, ELECTRA), block i of the n of `encoder.blocks()` (input to output) is at depth
    k = n - 1 - i from the top and gets `lr * layer_decay**k`; parameters in no block count as the lowest block.
    Each group has `params`, `lr` and `depth`. Without decay, or without blocks: one group at `lr`, depth 0.
    """
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    blocks = encoder.blocks() if layer_decay != 1.0 and trainable else []
    if not blocks:
        return [{"params": trainable, "lr": lr, "depth": 0}] if trainable else []
    depth_of = {id(p): len(blocks) - 1 - i for i, b in enumerate(blocks) for p in b.parameters()}
    by_depth: dict[int, list[nn.Parameter]] = defaultdict(list)
    for p in trainable:
        by_depth[depth_of.get(id(p), len(blocks) - 1)].append(p)
    return [{"params": by_depth[k], "lr": lr * layer_decay**k, "depth": k} for k in sorted(by_depth)]


def check_layer_decay(model: MultiTaskModel, layer_decay: float) -> None:
    """Refuse a `layer_decay` < 1 that would change nothing: no encoder has trainable blocks at two depths.

    Raises:
        ConfigError: one line naming `train.layer_decay`.
    """
    if layer_decay == 1.0:
        return
    if any(len(encoder_param_groups(e, 1.0, layer_decay)) > 1 for e in model.encoders.values()):
        return
    raise ConfigError(
        f"train.layer_decay: {layer_decay} changes nothing: no encoder trains blocks at two depths (each is frozen, "
        "has unfreeze: 1, or has no blocks); set unfreeze: N (N >= 2) or freeze: false on an image or text "
        "encoder, or remove train.layer_decay"
    )


def _reads_epoch_losses(weighting: nn.Module) -> bool:
    """Whether `weighting.on_epoch_end` is its own (DWA's reads the epoch's mean losses); `Weighting`'s does nothing."""
    hook = getattr(type(weighting), "on_epoch_end", None)
    return callable(hook) and hook is not Weighting.on_epoch_end


def _grad_norm64(module: nn.Module) -> float:
    """The L2 norm of a module's gradients, in float64."""
    grads = [p.grad.detach().double().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _local_only() -> bool:
    """`distributed_available_fn` of the module's metrics: they never sync (their input is already gathered)."""
    return False
