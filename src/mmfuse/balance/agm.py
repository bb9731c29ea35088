"""AGM: Adaptive Gradient Modulation (Li, Li, Hu, Wang, Wang, Zhou: "Boosting Multi-modal Model Performance
with Adaptive Gradient Modulation", ICCV 2023; official code github.com/lihong2303/AGM_ICCV2023,
`run/CREMAD_main.py`). On CREMA-D, AVE, UR-Funny, AV-MNIST and CMU-MOSEI it reports higher accuracy than
OGM-GE, G-Blend, MSES and MSLR.

Per training step, with the labelled samples of the scored task and each modality's mono-modal logits:

    s_m   = mean_i -log softmax(logits_m)_i[y_i]                 (the mono-modal cross-entropy, "score")
    r_m   = exp(mean_{j != m} s_j - s_m)                         (two modalities: exp(s_v - s_a), as official)
    r*_m  = exp(mean_{j != m} S_j - S_m)                         (S: running mean of s over all past steps)
    k_m   = exp(alpha * min(r*_m - r_m, 10))
    S_m  <- S_m * (t - 1) / t + s_m / t                          (t: the step count, from 1; S starts at 0)

A modality doing better than its own history relative to the others (r_m > r*_m) is slowed (k_m < 1), one
doing worse is sped up (k_m > 1): unlike OGM-GE, AGM also boosts the weak modality.

Deviations from the official code, and why:
- Mono-modal logits: AGM's are Shapley values from extra forwards with a modality zero-padded,
  `0.5 * (f(a, v) - f(0, v) + f(a, 0))`; here they are `Balancer.unimodal_logits` (the exact per-modality split
  of an additive fusion + linear head, otherwise linear probes on detached features), which needs no extra
  forward; for an additive model the Shapley value equals the exact split up to a constant.
- Where k_m acts: the official code scales the gradient flowing out of each mono-modal output (a backward hook).
  Here k_m scales, for one step, the learning rate of modality m's own parameters (`modality_parameters`), so the
  realised update changes by k_m under Adam/AdamW too (see `ogm_ge`). `max_coeff` caps k_m (the official cap is
  exp(10 alpha), a learning rate multiplier no optimiser survives).

Shapes: M modalities.
"""

from __future__ import annotations

import torch

from mmfuse.balance.base import BALANCERS
from mmfuse.balance.ogm_ge import OGMGE


def agm_coefficients(
    scores: torch.Tensor, running: torch.Tensor, alpha: float, max_coeff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) mono-modal cross-entropies and (M,) their running means -> (M,) coefficients k_m and ratios r_m."""
    m = scores.numel()
    if m < 2:
        return torch.ones_like(scores), torch.ones_like(scores)
    others = (scores.sum() - scores) / (m - 1)
    others_running = (running.sum() - running) / (m - 1)
    ratios = torch.exp(others - scores)
    optimal = torch.exp(others_running - running)
    coeffs = torch.exp(alpha * (optimal - ratios).clamp(max=10.0)).clamp(max=max_coeff)
    return coeffs, ratios


@BALANCERS.register("agm")
class AGM(OGMGE):
    """Adaptive Gradient Modulation: per-modality lr multipliers from mono-modal losses against their history.

    Args:
        modalities: the model's modality names.
        task: the binary or multiclass task that scores the modalities (default: the first such task).
        alpha: modulation strength (official default 1.0).
        start_epoch: first epoch with modulation.
        end_epoch: first epoch without modulation again.
        max_coeff: upper bound of k_m.
    """

    def __init__(
        self,
        modalities: list[str],
        task: str | None = None,
        alpha: float = 1.0,
        start_epoch: int = 0,
        end_epoch: int = 1_000_000,
        max_coeff: float = 10.0,
    ) -> None:
        super().__init__(modalities, task, alpha, start_epoch, end_epoch, noise=False)
        if max_coeff < 1:
            raise ValueError(f"agm: max_coeff must be >= 1, got {max_coeff}")
        self.max_coeff = max_coeff
        self.register_buffer("running", torch.zeros(len(self.modalities)))  # S_m, saved with checkpoints
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def score_terms(self, probs: torch.Tensor) -> torch.Tensor:
        """(N,) true-class probabilities -> (N,) mono-modal cross-entropies."""
        return -probs.clamp_min(1e-8).log()

    def coefficients(
        self, sums: torch.Tensor, count: int, update: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(M,) summed cross-entropies -> (M,) k_m against the running means (updated when `update`), and the
        series to log: the mean losses s_m and the ratios r_m."""
        losses = sums / max(count, 1)
        running = self.running.to(losses)
        coeffs, ratios = agm_coefficients(losses, running, self.alpha, self.max_coeff)
        if update:
            self.steps += 1
            t = float(self.steps)
            self.running.copy_(running * (t - 1) / t + losses / t)
        return coeffs, {"loss": losses, "ratio": ratios}
