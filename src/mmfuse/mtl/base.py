"""Multi-task loss weighting: the contract and the shared gradient machinery.

A weighting turns the per-task losses `{task: L_t}` into ONE call of `backward` (so that under DDP the
gradients are all-reduced exactly once per step) and returns the task weights it used, for logging.

- Loss-based methods (equal, static, uncertainty, DWA) backward `sum_t w_t L_t (+ extra)`.
- Gradient-based methods (PCGrad, CAGrad) compute the per-task gradients g_t on the shared parameters
  with `torch.autograd.grad` (no `.grad` is written, so DDP's hooks do not fire), combine them into g*,
  and backward one surrogate loss whose gradient is g* on the shared parameters and the ordinary
  gradient everywhere else (`surrogate_loss`).

Shapes: T tasks, P the total number of shared parameter elements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from mmfuse.registry import Registry

WEIGHTINGS: Registry[type[Weighting]] = Registry("weighting")

BackwardFn = Callable[[torch.Tensor], None]


def default_backward(loss: torch.Tensor) -> None:
    """`loss.backward()`; the trainer passes Lightning's `manual_backward` instead."""
    loss.backward()


class Weighting(nn.Module):
    """Base class of every task weighting (an `nn.Module`, so learned weights are checkpointed).

    Subclasses take `tasks` (the task names, in the model's order) and flat options. Loss-based
    methods override `weigh`; gradient-based ones subclass `GradientWeighting`; a method that reads the
    shared parameters otherwise (GradNorm) overrides `objective`.

    Args:
        tasks: the task names.
    """

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a weighting needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names: {tasks}")
        self.tasks = list(tasks)

    def weigh(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted total of the stacked losses (T,) and the weights (T,) used (detached), for loss-based methods."""
        raise NotImplementedError

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        shared_params: Sequence[nn.Parameter],
        backward: BackwardFn = default_backward,
        extra_loss: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Make exactly one `backward` call for this step and return {task: weight used}.

        Args:
            losses: {task: scalar loss}; every task of `tasks` must be present.
            shared_params: the parameters shared by all tasks (encoders + fusion) that require grad.
            backward: called once with the final scalar (e.g. Lightning's `manual_backward`).
            extra_loss: an optional scalar added unweighted (e.g. a balancer's auxiliary loss).
        """
        return self.as_dict(self.backward_tensors(losses, shared_params, backward, extra_loss)[1])

    def backward_tensors(
        self,
        losses: Mapping[str, torch.Tensor],
        shared_params: Sequence[nn.Parameter],
        backward: BackwardFn = default_backward,
        extra_loss: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`backward` without the host sync of reading the weights: returns the stacked losses (T,) and the weights
        (T,), both detached, on the losses' device. The trainer reads them only on the steps it logs."""
        stacked = self.stack(losses)
        total, weights = self.objective(stacked, shared_params)
        backward(add_extra(total, extra_loss))
        return stacked.detach(), weights.detach() if weights.requires_grad else weights

    def objective(
        self, losses: torch.Tensor, shared_params: Sequence[nn.Parameter]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scalar this step backwards (before `extra_loss`), from the stacked losses (T,), and the weights (T,)
        to log. Default: `weigh(losses)`; GradNorm and the gradient-based methods override it."""
        return self.weigh(losses)

    def on_epoch_end(self, epoch: int, losses: Mapping[str, float]) -> None:
        """Called once per training epoch with each task's epoch-mean loss (tasks without labels may be missing)."""

    def stack(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{task: scalar} -> (T,) in `tasks` order; a clear error for a missing task."""
        missing = [t for t in self.tasks if t not in losses]
        if missing:
            raise KeyError(f"{type(self).__name__}: no loss for task(s) {missing}; got {sorted(losses)}")
        return torch.stack([v if v.dim() == 0 else v.reshape(()) for v in (losses[t] for t in self.tasks)])

    def as_dict(self, weights: torch.Tensor) -> dict[str, float]:
        return {t: float(w) for t, w in zip(self.tasks, weights.detach().cpu().tolist())}

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


def add_extra(total: torch.Tensor, extra_loss: torch.Tensor | None) -> torch.Tensor:
    return total if extra_loss is None else total + extra_loss


def task_gradients(losses: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """Per-task gradients on `params`, flattened: (T, P). Unused parameters give zeros.

    Uses `torch.autograd.grad(..., retain_graph=True)`, which writes no `.grad` and fires no DDP hook.
    """
    rows = []
    for loss in losses:
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        else:  # a constant loss (e.g. a task without labelled rows built without a graph)
            grads = (None,) * len(params)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        )
    return torch.stack(rows)  # (T, P)


def surrogate_loss(
    losses: torch.Tensor, params: Sequence[nn.Parameter], combined: torch.Tensor, task_grads: torch.Tensor
) -> torch.Tensor:
    """The scalar whose gradient is `combined` (P,) on `params` and the ordinary gradient everywhere else.

    `sum_t L_t + sum_p (p * (g*_p - sum_t g_t,p).detach()).sum()`: the shared parameters receive
    `sum_t g_t + (g* - sum_t g_t) = g*`, task-specific parameters (heads) their usual `dL_t/dθ`, all in one
    backward, so DDP synchronises the final gradients once.

    Args:
        losses: (T,) the task losses, still attached to the graph.
        params: the shared parameters the task gradients were taken on.
        combined: (P,) g*, the combined shared gradient.
        task_grads: (T, P) the per-task gradients `task_gradients` returned.
    """
    correction = (combined - task_grads.sum(0)).detach()  # (P,)
    total = losses.sum()
    offset = 0
    for p in params:
        n = p.numel()
        total = total + (p * correction[offset : offset + n].view_as(p)).sum()
        offset += n
    return total


def surrogate_backward(
    losses: torch.Tensor,
    params: Sequence[nn.Parameter],
    combined: torch.Tensor,
    task_grads: torch.Tensor,
    backward: BackwardFn = default_backward,
    extra_loss: torch.Tensor | None = None,
) -> None:
    """One backward call of `surrogate_loss` (+ `extra_loss`, added unweighted; its gradient adds to g* where it
    reaches the shared parameters)."""
    backward(add_extra(surrogate_loss(losses, params, combined, task_grads), extra_loss))


class GradientWeighting(Weighting):
    """Base of the methods that combine per-task gradients on the shared parameters into one g*."""

    def combine(self, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, P) per-task gradients -> g* (P,) and per-task weights (T,) to log."""
        raise NotImplementedError

    def objective(
        self, losses: torch.Tensor, shared_params: Sequence[nn.Parameter]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`surrogate_loss` of g* (`combine` of the per-task gradients) and the weights `combine` gave."""
        params = [p for p in shared_params if p.requires_grad]
        if not params:  # nothing shared to combine: ordinary sum of the losses
            return losses.sum(), torch.ones_like(losses)
        grads = task_gradients(losses, params)
        combined, weights = self.combine(grads)
        return surrogate_loss(losses, params, combined, grads), weights
