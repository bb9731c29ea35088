"""CAGrad: conflict-averse gradient descent (Liu, Liu, Jin, Stone and Liu, NeurIPS 2021).

With g_0 the mean of the task gradients and phi = c^2 |g_0|^2, CAGrad solves the dual over the simplex

    min_{w in simplex}  F(w) = g_w . g_0 + sqrt(phi) |g_w|,    g_w = sum_t w_t g_t

and updates along d = g_0 + sqrt(phi) / |g_w| * g_w, divided by (1 + c^2) (the official `rescale=1`).
c = 0 gives the mean gradient. The dual only needs the T x T Gram matrix: T = 2 is solved in closed
form (F is convex in the one free weight), T > 2 by projected gradient descent on the simplex.

Note the scale: like the paper, d is built on the mean gradient, not the sum, of the task gradients.

Shapes: T tasks, P shared parameter elements.
"""

from __future__ import annotations

import math

import torch

from mmfuse.mtl.base import WEIGHTINGS, GradientWeighting


def dual_objective(w: torch.Tensor, gram: torch.Tensor, scale: float) -> torch.Tensor:
    """F(w) = w^T G b + scale * sqrt(w^T G w), b uniform; `scale` = c |g_0|."""
    b = torch.full_like(w, 1.0 / len(w))
    return w @ gram @ b + scale * torch.sqrt((w @ gram @ w).clamp_min(0) + 1e-12)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of v (T,) onto the probability simplex (Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    k = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = int((u - css / k > 0).nonzero().max())
    return (v - css[rho] / (rho + 1)).clamp_min(0)


def solve_two(gram: torch.Tensor, scale: float) -> torch.Tensor:
    """Closed-form minimiser for T = 2 over w = (x, 1 - x), x in [0, 1]."""
    b = gram.mean(1)  # (2,) G b
    lin = float(b[0] - b[1])  # dF/dx of the linear part
    q0, q1, q2 = float(gram[1, 1]), float(gram[0, 1] - gram[1, 1]), float(gram[0, 0] - 2 * gram[0, 1] + gram[1, 1])
    candidates = [0.0, 1.0]  # |g_w|^2 = q0 + 2 q1 x + q2 x^2
    if scale > 0 and q2 > 1e-12:
        k = -lin / scale  # stationary point: (q1 + q2 x) / sqrt(Q(x)) = k
        disc = max(q0 * q2 - q1 * q1, 0.0)
        if k * k < q2:
            u = math.copysign(abs(k) * math.sqrt(disc / (q2 - k * k)), k)
            candidates.append(min(max((u - q1) / q2, 0.0), 1.0))
    ws = [torch.tensor([x, 1 - x], dtype=gram.dtype, device=gram.device) for x in candidates]
    return min(ws, key=lambda w: float(dual_objective(w, gram, scale)))


def solve_simplex(gram: torch.Tensor, scale: float, steps: int = 300, lr: float = 0.2) -> torch.Tensor:
    """Projected gradient descent on the simplex for any T; returns the best iterate."""
    norm = float(gram.diagonal().max()) or 1.0  # F is homogeneous in G: normalise for a scale-free step
    gram, scale = gram / norm, scale / math.sqrt(norm)
    w = torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=gram.dtype, device=gram.device)
    best, best_f = w, float(dual_objective(w, gram, scale))
    for step in range(steps):
        w = w.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(dual_objective(w, gram, scale), w)
        w = project_simplex(w.detach() - lr / math.sqrt(step + 1) * grad)
        f = float(dual_objective(w, gram, scale))
        if f < best_f:
            best, best_f = w, f
    return best


def cagrad_direction(
    grads: torch.Tensor, c: float, rescale: bool = True, steps: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAGrad's update direction (P,) from the per-task gradients (T, P), and the effective task weights (T,).

    The direction is `sum_t a_t g_t` with `a_t = (1/T + lambda w_t) / (1 + c^2)`; `a` is returned for logging.
    """
    t = grads.shape[0]
    gram = (grads @ grads.T).double()  # (T, T)
    g0_norm = math.sqrt(max(float(gram.mean()), 0.0))
    scale = c * g0_norm
    w = solve_two(gram, scale) if t == 2 else solve_simplex(gram, scale, steps)
    gw_norm = math.sqrt(max(float(w @ gram @ w), 0.0))
    lam = scale / (gw_norm + 1e-8)
    coeffs = (torch.full_like(w, 1.0 / t) + lam * w) / ((1 + c * c) if rescale else 1.0)  # (T,)
    coeffs = coeffs.to(grads.dtype)
    return coeffs @ grads, coeffs


@WEIGHTINGS.register("cagrad")
class CAGrad(GradientWeighting):
    """Conflict-averse direction: the best worst-case local improvement within a ball around the mean gradient.

    Only the shared parameters are combined; task heads get their ordinary gradients.

    Args:
        tasks: the task names.
        c: the ball radius relative to |g_0| (0.5 in the paper; 0 is plain gradient averaging).
        rescale: divide the direction by (1 + c^2), as the official code does by default.
        steps: projected-gradient steps of the dual for more than two tasks.
    """

    def __init__(self, tasks: list[str], c: float = 0.5, rescale: bool = True, steps: int = 300) -> None:
        super().__init__(tasks)
        if c < 0:
            raise ValueError(f"cagrad: c must be >= 0, got {c}")
        self.c, self.rescale, self.steps = c, rescale, steps

    def combine(self, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cagrad_direction(grads, self.c, self.rescale, self.steps)
