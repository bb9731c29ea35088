"""OGM-GE: On-the-fly Gradient Modulation with Generalisation Enhancement (Peng et al., CVPR 2022).

Per training batch, with the labelled samples of the scored task:

    s_m = sum_i softmax(logits_m)_i[y_i]                                   (sigmoid for a binary task)
    rho_m = s_m / mean_{j != m} s_j                                        (two modalities: s_a / s_b)
    k_m = 1 - tanh(alpha * rho_m)  if rho_m > 1  else 1                    (Eq. 10 of the paper)

Where k_m acts (the variant used here, and why): the official code multiplies the gradients of the
encoder by k_m before an SGD-with-momentum step. Under Adam/AdamW that is (almost) a no-op: the update is
the gradient divided by its own running RMS, so a slowly varying k_m cancels. Here k_m multiplies, for
this one step, the learning rate of the optimiser groups that hold modality m's own parameters (its
unfrozen encoder and its projection/adapter inside the fusion, `balance.base.modality_parameters`). The
realised update of those parameters is then exactly k_m times the unmodulated one, under AdamW (Adam's
step and its decoupled weight decay both scale with the learning rate) and under SGD. With plain SGD this
equals the paper's rule; with momentum the paper feeds k_m * grad into the velocity, whereas here the
velocity accumulates raw gradients and the step taken from it is scaled by k_m (the same when k_m is
steady, which it is over most of training).

GE (`noise`): Gaussian noise with the standard deviation of each parameter's own gradient (+1e-8) is
added to that gradient, on every modality's own parameters, as in the official code. Since the step's
learning rate is scaled by k_m, the applied noise has std k_m * std(grad) = std(k_m * grad): the official
`grad * k + N(0, std(grad * k))` exactly, for SGD.

For two modalities this is the official rule, except on an exact tie (rho = 1), where the official code
modulates the second modality and this one neither. For more modalities, each is compared with the mean
score of the others, so only modalities ahead of the rest are slowed down.

`alpha` defaults to 0.1, the official README's default setting (it recommends 0.1 for VGGSound and 0.8
for CREMA-D). Modulation runs only while training and `start_epoch <= epoch < end_epoch` (0 and 50 in
the official defaults). Under DDP the scores are summed over processes and the noise comes from a
generator seeded alike on every process, so all replicas apply the same update. A modality without any
trainable parameter of its own (frozen encoder, fusion without a projection for it) is a config error.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from mmfuse.balance.base import (
    BALANCERS,
    Balancer,
    Tensors,
    fusion_decomposes,
    linear_head,
    modality_parameters,
    require_modality_parameters,
)

if TYPE_CHECKING:
    from mmfuse.model import ModelOutput, MultiTaskModel

logger = logging.getLogger(__name__)


def ogm_coefficients(scores: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) scores -> (M,) coefficients k_m and (M,) discrepancy ratios rho_m (see the module docstring)."""
    m = scores.numel()
    if m < 2:
        return torch.ones_like(scores), torch.ones_like(scores)
    others = (scores.sum() - scores) / (m - 1)  # mean score of the other modalities
    ratios = scores / others.clamp_min(1e-12)
    coeffs = torch.where(ratios > 1, 1 - torch.tanh(alpha * ratios), torch.ones_like(ratios))
    return coeffs, ratios


@BALANCERS.register("ogm_ge")
class OGMGE(Balancer):
    """Slow down the encoders of modalities that already predict well alone (OGM), plus gradient noise (GE).

    Args:
        modalities: the model's modality names.
        task: the binary or multiclass task whose labels score the modalities (default: the first such task).
        alpha: modulation strength.
        start_epoch: first epoch with modulation.
        end_epoch: first epoch without modulation again.
        noise: add the GE noise.
        seed: seeds the noise generator (the same on every DDP process).
    """

    def __init__(
        self,
        modalities: list[str],
        task: str | None = None,
        alpha: float = 0.1,
        start_epoch: int = 0,
        end_epoch: int = 50,
        noise: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(modalities)
        if alpha < 0:
            raise ValueError(f"ogm_ge: alpha must be >= 0, got {alpha}")
        self.task, self.alpha, self.noise, self.seed = task, alpha, noise, seed
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self._generators: dict[str, torch.Generator] = {}

    def setup(self, model: MultiTaskModel) -> None:
        super().setup(model)
        require_modality_parameters("ogm_ge", model)
        scorable = [n for n, t in model.tasks.items() if t.scores_classes]
        if self.task is None:
            if not scorable:
                raise ValueError(f"ogm_ge needs a binary or multiclass task; tasks: {list(model.tasks)}")
            self.task = scorable[0]
        elif self.task not in scorable:
            raise ValueError(f"ogm_ge: task {self.task!r} is not a binary/multiclass task of the model: {scorable}")
        exact = linear_head(model.heads[self.task]) is not None and fusion_decomposes(model.fusion)
        if not exact and self.probes is None:
            self.build_probes(model, self.task)
        logger.info("ogm_ge scores task %r with %s", self.task, "exact logits" if exact else "linear probes")

    def active(self, model: MultiTaskModel, epoch: int, count: int) -> bool:
        """Whether this step is modulated: training, inside [start_epoch, end_epoch), with scored rows."""
        return model.training and self.start_epoch <= epoch < self.end_epoch and count > 0

    def modulate(
        self, model: MultiTaskModel, out: ModelOutput, labels: Tensors, masks: Tensors, epoch: int
    ) -> dict[str, float]:
        self.ensure_setup(model)
        sums, count = self.scores(model, out, labels[self.task], masks[self.task])
        active = self.active(model, epoch, count)
        coeffs, series = self.coefficients(sums, count, update=model.training and count > 0)
        if active and self.noise:
            for m in self.modalities:
                self.add_noise(modality_parameters(model, m))
        return self.set_lr_scale(coeffs, active, **series)

    def score_terms(self, probs: torch.Tensor) -> torch.Tensor:
        """(N,) true-class probabilities -> (N,) the terms summed into a modality's score (here: themselves)."""
        return probs

    def coefficients(
        self, sums: torch.Tensor, count: int, update: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(M,) summed score terms of `count` labelled samples -> (M,) k_m and the (M,) series to log, by name.

        `update`: whether this step counts towards a subclass's history (AGM's running means)."""
        coeffs, ratios = ogm_coefficients(sums, self.alpha)
        return coeffs, {"score": sums, "ratio": ratios}

    def set_lr_scale(self, coeffs: torch.Tensor, active: bool, **series: torch.Tensor) -> dict[str, float]:
        """Set `lr_scale` from the (M,) coefficients (all 1 when not `active`); the values to log, what was
        applied included: `coef/<m>`, and `<name>/<m>` for each (M,) tensor of `series`."""
        if not active:
            coeffs = torch.ones_like(coeffs)
        self.lr_scale = {m: float(coeffs[i]) for i, m in enumerate(self.modalities)}
        logs = {f"coef/{m}": k for m, k in self.lr_scale.items()}
        for name, values in series.items():
            logs.update({f"{name}/{m}": float(values[i]) for i, m in enumerate(self.modalities)})
        return logs

    def ensure_setup(self, model: MultiTaskModel) -> None:
        """Set up on first use; probes made this late would never reach the optimiser, so that is an error."""
        if self.ready:
            return
        self.setup(model)
        if self.probes is not None:
            self.probes, self.probe_task, self.ready = None, None, False
            raise RuntimeError(
                f"{type(self).__name__} needs linear probes here: call balancer.setup(model) before the optimiser"
            )

    @torch.no_grad()
    def scores(
        self, model: MultiTaskModel, out: ModelOutput, target: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """(M,) `score_terms` of the true-class probabilities summed per modality over the labelled samples (and
        over DDP processes), and their count."""
        logits = self.unimodal_logits(model, out, self.task)
        mask, task = mask.bool(), model.tasks[self.task]
        sums = [
            self.score_terms(task.true_class_probability(logits[m][mask], target[mask])).sum() for m in self.modalities
        ]
        stats = torch.stack([*sums, mask.sum().to(sums[0].dtype)]).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        return stats[:-1], int(stats[-1])

    @torch.no_grad()
    def add_noise(self, params: list[nn.Parameter]) -> None:
        """grad <- grad + N(0, std(grad) + 1e-8), per parameter with a gradient (GE)."""
        for g in (p.grad for p in params if p.grad is not None):
            std = g.std() if g.numel() > 1 else g.new_zeros(())
            g.add_(self._randn_like(g) * (std + 1e-8))

    def _randn_like(self, t: torch.Tensor) -> torch.Tensor:
        key = str(t.device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=t.device).manual_seed(self.seed)
        return torch.randn(t.shape, generator=self._generators[key], device=t.device, dtype=t.dtype)
