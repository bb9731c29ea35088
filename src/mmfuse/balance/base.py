"""Modality balancing: the contract, and per-modality logits to score how well each modality does alone.

A balancer hooks into a training step at three points (all optional):
`absent` (before the forward: which modalities to hide per sample), `aux_loss` (an extra loss added
to the single backward) and `modulate` (after the backward, before the optimiser step: edit gradients,
and set `lr_scale`, {modality: k}: the trainer multiplies, for this one step, the learning rate of every
optimiser parameter group holding that modality's own parameters by k, so the realised update of those
parameters shrinks (or grows) by exactly k under SGD and AdamW alike; see `modality_parameters`).

Per-modality ("unimodal") logits come from one of two sources, chosen once in `setup(model)`:

- exact decomposition, when the fusion returns `contributions` (sum, concat) and the task head is
  linear (an `MLPHead` without hidden layers, or an `nn.Linear`):
  `logits_m = W_head contribution_m + (W_head bias + b_head) / M`, so `sum_m logits_m` equals the
  model's logits (head dropout, if any, is treated as at evaluation time);
- otherwise, linear probes: one `nn.Linear(D_m, C)` per modality on that modality's DETACHED pooled
  features (so they never change the encoders), trained with the task's own loss through `aux_loss`.
  They are built in `setup`, before the optimiser exists, so they are optimised and checkpointed.

Shapes: B batch, C outputs of the scored task, D_m feature size of modality m, D_out fused size, M modalities.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from mmfuse.registry import Registry
from mmfuse.tasks.heads import linear_head

if TYPE_CHECKING:
    from mmfuse.fusion.base import FusionOutput
    from mmfuse.model import ModelOutput, MultiTaskModel

logger = logging.getLogger(__name__)

BALANCERS: Registry[type[Balancer]] = Registry("balancer")
Tensors = Mapping[str, torch.Tensor]  # {name: tensor}: labels, masks, missing modalities


def decompose_logits(linear: nn.Linear, fusion: FusionOutput) -> dict[str, torch.Tensor]:
    """{modality: (B, C)} with `sum_m logits_m == linear(fusion.fused)` exactly (up to rounding)."""
    parts = fusion.contributions
    shared = linear.bias if linear.bias is not None else 0.0
    if fusion.bias is not None:
        shared = shared + fusion.bias @ linear.weight.T  # (C,)
    return {m: c @ linear.weight.T + shared / len(parts) for m, c in parts.items()}  # each (B, C)


@torch.no_grad()
def fusion_decomposes(fusion: nn.Module) -> bool:
    """Whether `fusion` returns a contribution for every modality (one dry run on zeros, in eval mode)."""
    from mmfuse.encoders.base import EncoderOutput

    ref = next(iter(fusion.parameters()), torch.zeros(()))
    feats = {
        m: EncoderOutput(
            pooled=ref.new_zeros(2, d),
            tokens=ref.new_zeros(2, 1, d),
            mask=torch.ones(2, 1, dtype=torch.bool, device=ref.device),
        )
        for m, d in fusion.input_dims.items()
    }
    was_training = fusion.training
    fusion.eval()
    try:
        out = fusion(feats)
    except Exception:  # noqa: BLE001  (any failure just means: do not rely on contributions)
        logger.debug("dry run of %s failed; using probes", type(fusion).__name__, exc_info=True)
        return False
    finally:
        fusion.train(was_training)
    return set(out.contributions) == set(fusion.input_dims)


def modality_parameters(model: MultiTaskModel, modality: str) -> list[nn.Parameter]:
    """The trainable parameters that belong to `modality` alone: its encoder's unfrozen parameters and the
    fusion's own projection/adapter for it (`Fusion.modality_parameters`)."""
    params = [*model.encoders[modality].parameters(), *model.fusion.modality_parameters(modality)]
    return [p for p in params if p.requires_grad]


def require_modality_parameters(name: str, model: MultiTaskModel) -> None:
    """Raise ValueError (one line) when some modality owns no trainable parameter a balancer could act on."""
    empty = [m for m in model.modalities if not modality_parameters(model, m)]
    if empty:
        raise ValueError(
            f"{name} has nothing to act on for modality(ies) {empty}: their encoders are frozen and fusion "
            f"{type(model.fusion).__name__} has no projection of their own; unfreeze the encoder or use a fusion "
            "with per-modality projections (sum, gated, bilinear, tensor, lmf, co_attention, or concat/film with "
            "adapters: true)"
        )


class Balancer(nn.Module):
    """Base class of every modality balancer; every hook defaults to doing nothing.

    Subclasses take `modalities` (the model's modality names) and flat options. The trainer calls
    `setup(model)` once after building the model and before creating the optimiser (and before
    loading a checkpoint), then per training step `absent`, `aux_loss` and `modulate`.

    Attributes read by the trainer (declared here, so every balancer has them):
        task: the task whose labels score the modalities (None when the balancer scores none); the trainer
            logs per-modality accuracy of it (or of `probe_task`).
        probe_task: the task the linear probes predict, once `build_probes` ran (else None).
        lr_scale: {modality: k} for the coming optimiser step, set by `modulate` (empty: no change).
        drops_modalities: whether `absent` hides whole modalities in training.
        absent_logs: values to log left by the last `absent` call; the base `modulate` returns a copy.

    Args:
        modalities: the modality names, in the model's order.
    """

    drops_modalities = False  # hides whole modalities in training: the model learns to predict without them

    def __init__(self, modalities: list[str]) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("a balancer needs at least one modality")
        self.modalities = list(modalities)
        self.task: str | None = None  # subclasses that score the modalities set it (in __init__ or setup)
        self.probes: nn.ModuleDict | None = None
        self.probe_task: str | None = None
        self._probe_loss = None  # the scored Task's masked_loss, set with the probes
        self.ready = False
        self.lr_scale: dict[str, float] = {}  # {modality: k} for the coming optimiser step, set by `modulate`
        self.absent_logs: dict[str, float] = {}  # values to log left by the last `absent`; `modulate` returns them

    def setup(self, model: MultiTaskModel) -> None:
        """Bind to a built model (create any parameters here, so the optimiser sees them). Idempotent."""
        if set(model.modalities) != set(self.modalities):
            raise ValueError(f"{type(self).__name__}: modalities {self.modalities} != the model's {model.modalities}")
        self.ready = True

    def absent(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        training: bool = True,
        missing: Tensors | None = None,
    ) -> dict[str, torch.Tensor] | None:
        """{modality: (B,) bool, True = hide this modality for this sample}, or None to hide nothing.

        `missing` ({modality: (B,) bool}) marks modalities the batch already lacks, if the caller knows them.
        """
        return None

    def aux_loss(self, out: ModelOutput, labels: Tensors, masks: Tensors) -> torch.Tensor | None:
        """An extra scalar for the step's single backward (the probes' loss), or None."""
        if self.probes is None or self.probe_task is None:
            return None
        target, mask = labels[self.probe_task], masks[self.probe_task]
        losses = [
            self._probe_loss(probe(out.features[m].pooled.detach()), target, mask) for m, probe in self.probes.items()
        ]
        return torch.stack(losses).sum()

    def modulate(
        self, model: MultiTaskModel, out: ModelOutput, labels: Tensors, masks: Tensors, epoch: int
    ) -> dict[str, float]:
        """Edit gradients after the backward, before the optimiser step; returns values to log (here: a copy of
        `absent_logs`, what the step's `absent` call left to log)."""
        return dict(self.absent_logs)

    def build_probes(self, model: MultiTaskModel, task: str) -> None:
        """One linear probe per modality, (B, D_m) -> (B, C_task), on the device/dtype of the task head."""
        ref = next(model.heads[task].parameters())
        dims = {m: model.encoders[m].output_dim for m in self.modalities}
        out_dim = model.tasks[task].out_dim
        self.probes = nn.ModuleDict(
            {m: nn.Linear(d, out_dim, device=ref.device, dtype=ref.dtype) for m, d in dims.items()}
        )
        self.probe_task, self._probe_loss = task, model.tasks[task].masked_loss

    def unimodal_logits(self, model: MultiTaskModel, out: ModelOutput, task: str) -> dict[str, torch.Tensor]:
        """{modality: (B, C)} logits of `task` from each modality alone (see the module docstring)."""
        linear = linear_head(model.heads[task])
        if linear is not None and out.fusion.contributions:
            return decompose_logits(linear, out.fusion)
        if self.probes is None or self.probe_task != task:
            raise RuntimeError(
                f"task {task!r}: the fusion gives no per-modality contributions or the head is not linear, and no "
                "probes were built; call balancer.setup(model) before creating the optimiser"
            )
        return {m: probe(out.features[m].pooled.detach()) for m, probe in self.probes.items()}

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}"
