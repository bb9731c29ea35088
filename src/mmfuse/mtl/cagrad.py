"""CAGrad: conflict-averse gradient descent (Liu, Liu, Jin, Stone and Liu, NeurIPS 2021).

With g_0 the mean of the task gradients and phi = c^2 |g_0|^2, CAGrad solves the dual over the simplex

    min_{w in simplex}  F(w) = g_w . g_0 + sqrt(phi) |g_w|,    g_w = sum_t w_t g_t

and updates along d = g_0 + sqrt(phi) / |g_w| * g_w, divided by (1 + c^2) (the official `rescale=1`).
c = 0 gives the mean gradient. This is the formulation of the official code (`cagrad` in the authors'
`nyuv2/utils.py`), which hands the dual to scipy's SLSQP.

Here the dual is solved to a certificate instead. It only needs the T x T Gram matrix G: T = 2 in
closed form (F is convex in the one free weight), T > 2 by an active-set Newton method on the simplex
(`solve_simplex`). The stopping rule is the duality gap: d(w) = g_0 + sqrt(phi) g_w / |g_w| is feasible
for the primal max_d min_t g_t . d over the ball |d - g_0| <= c |g_0|, and

    gap(w) = F(w) - min_t g_t . d(w) = grad F(w) . w - min_t grad F(w)_t  >= F(w) - F*,

so the solver stops at gap <= tol times the problem's scale (max_t |(G b)_t| + sqrt(phi)).

Note the scale: like the paper, d is built on the mean gradient, not the sum, of the task gradients.

Shapes: T tasks, P shared parameter elements.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from mmfuse.mtl.base import WEIGHTINGS, GradientWeighting

log = logging.getLogger(__name__)


def dual_objective(w: torch.Tensor, gram: torch.Tensor, scale: float) -> torch.Tensor:
    """F(w) = w^T G b + scale * sqrt(w^T G w), b uniform; `scale` = c |g_0|."""
    b = torch.full_like(w, 1.0 / len(w))
    return w @ gram @ b + scale * torch.sqrt((w @ gram @ w).clamp_min(0))


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


class _Dual:
    """F(w), its gradient and Hessian for a Gram matrix normalised to max diag 1 (numpy, float64).

    |g_w| is smoothed to sqrt(|g_w|^2 + 1e-20): F moves by at most 1e-10 times its scale, and the
    kink at g_w = 0 (reached when 0 is a convex combination of the gradients) stays finite.
    """

    SMOOTH = 1e-20

    def __init__(self, gram: np.ndarray, scale: float) -> None:
        self.gram, self.scale = gram, scale
        self.lin = gram.mean(1)  # (T,) G b
        self.size = float(np.abs(self.lin).max()) + scale  # the scale of F's values on the simplex

    def norm(self, w: np.ndarray) -> float:
        return math.sqrt(max(float(w @ self.gram @ w), 0.0) + self.SMOOTH)

    def value(self, w: np.ndarray) -> float:
        return float(self.lin @ w) + self.scale * self.norm(w)

    def grad(self, w: np.ndarray) -> tuple[np.ndarray, float]:
        """(grad F (T,), smoothed |g_w|); grad F_t = g_t . d(w), the primal value of task t."""
        r = self.norm(w)
        return self.lin + self.scale * (self.gram @ w) / r, r

    def hessian(self, w: np.ndarray, r: float) -> np.ndarray:
        gw = self.gram @ w
        return self.scale / r * (self.gram - np.outer(gw, gw) / (r * r))


def _newton_step(dual: _Dual, w: np.ndarray, grad: np.ndarray, r: float, free: np.ndarray) -> np.ndarray:
    """Newton direction on the face {w_i = 0 for i not free, sum w = 1}: (T,), zero off the face."""
    idx = np.flatnonzero(free)
    h = dual.hessian(w, r)[np.ix_(idx, idx)]
    h += (1e-12 * max(float(np.trace(h)), 1e-300)) * np.eye(len(idx))  # the Hessian is only semi-definite
    kkt = np.zeros((len(idx) + 1, len(idx) + 1))
    kkt[:-1, :-1], kkt[:-1, -1], kkt[-1, :-1] = h, 1.0, 1.0
    rhs = np.concatenate([-grad[idx], [0.0]])
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    d = np.zeros_like(w)
    d[idx] = sol[:-1]
    return d


def _projected_gradient_step(dual: _Dual, w: np.ndarray, grad: np.ndarray, f: float) -> np.ndarray:
    """A safeguard step that always decreases F: projected gradient with backtracking."""
    step = 1.0
    for _ in range(60):
        w_new = project_simplex(torch.from_numpy(w - step * grad)).numpy()
        if dual.value(w_new) < f - 1e-4 * float(grad @ (w - w_new)):
            return w_new
        step *= 0.5
    return w


def solve_simplex(gram: torch.Tensor, scale: float, tol: float = 1e-9, max_iter: int = 100) -> torch.Tensor:
    """Minimise F over the simplex for any T by an active-set Newton method; stops at duality gap <= tol.

    Each iteration takes a Newton step on the current face (the free weights, summing to one) with a
    ratio test that fixes a weight at zero when it would turn negative, and frees a fixed weight when
    its gradient says F decreases by raising it. F is convex, so the method converges; a projected
    gradient step is the fallback whenever Newton makes no progress.

    Args:
        gram: (T, T) Gram matrix of the task gradients.
        scale: c |g_0|.
        tol: duality gap at which to stop, relative to the problem's scale.
        max_iter: iteration limit (Newton converges in a few dozen for T <= 50).

    Returns:
        w (T,) on the simplex, in gram's dtype and device.
    """
    t = gram.shape[0]
    g = gram.detach().double().cpu().numpy()
    norm = float(g.diagonal().max())
    if norm <= 0 or scale <= 0:  # F is linear (or zero): a vertex is optimal
        w = np.zeros(t)
        w[int(np.argmin(g.mean(1)))] = 1.0
        return torch.from_numpy(w).to(gram)
    dual = _Dual(g / norm, scale / math.sqrt(norm))  # F is homogeneous of degree 1 in G
    w, free = np.full(t, 1.0 / t), np.ones(t, dtype=bool)
    for _ in range(max_iter):
        f = dual.value(w)
        grad, r = dual.grad(w)
        if grad @ w - grad.min() <= tol * dual.size:
            break
        w_new = _active_set_step(dual, w, grad, r, f, free, tol)
        if w_new is None:
            w_new = _projected_gradient_step(dual, w, grad, f)
            free = w_new > 0
            if np.array_equal(w_new, w):  # no step decreases F in floating point: as solved as it gets
                break
        w = w_new
    else:
        grad, _ = dual.grad(w)
        gap = float(grad @ w - grad.min())
        log.debug("cagrad: dual not solved to tol %.1e in %d iterations (gap %.2e)", tol, max_iter, gap)
    return torch.from_numpy(w).to(gram)


def _active_set_step(
    dual: _Dual, w: np.ndarray, grad: np.ndarray, r: float, f: float, free: np.ndarray, tol: float
) -> np.ndarray | None:
    """One active-set Newton iteration; updates `free` in place. None when it cannot decrease F."""
    if float(np.ptp(grad[free])) <= tol * dual.size:  # optimal on this face: free the most promising weight
        fixed = np.flatnonzero(~free)
        if len(fixed) == 0:
            return None
        j = fixed[np.argmin(grad[fixed])]  # the caller checked the gap, so grad[j] < grad[free]
        free[j] = True
        d = _newton_step(dual, w, grad, r, free)
        if d[j] <= 0:  # Newton would not raise it: let the safeguard step do it
            return None
    else:
        d = _newton_step(dual, w, grad, r, free)
    stuck = free & (w <= 0) & (d < 0)
    while stuck.any():  # a free weight at zero that Newton would lower: fix it and solve again
        free[stuck] = False
        if not free.any():
            return None
        d = _newton_step(dual, w, grad, r, free)
        stuck = free & (w <= 0) & (d < 0)
    slope = float(grad @ d)
    if slope >= 0:
        return None
    neg = d < 0
    ratios = np.where(neg, w / np.where(neg, -d, 1.0), np.inf)
    block = int(np.argmin(ratios))
    step = step_max = min(1.0, float(ratios[block]))
    for _ in range(60):
        w_new = np.maximum(w + step * d, 0.0)
        f_new = dual.value(w_new)
        if f_new <= f + 1e-4 * step * slope and f_new < f:
            break
        step *= 0.5
    else:
        return None
    if step == step_max and step_max < 1.0:  # a weight reached zero: fix it there
        w_new[block], free[block] = 0.0, False
    return w_new / w_new.sum()


def cagrad_direction(
    grads: torch.Tensor, c: float, rescale: bool = True, tol: float = 1e-9
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAGrad's update direction (P,) from the per-task gradients (T, P), and the effective task weights (T,).

    The direction is `sum_t a_t g_t` with `a_t = (1/T + lambda w_t) / (1 + c^2)`; `a` is returned for logging.
    """
    t = grads.shape[0]
    gram = grads.double() @ grads.double().T  # (T, T)
    g0_norm = math.sqrt(max(float(gram.mean()), 0.0))
    scale = c * g0_norm
    w = solve_two(gram, scale) if t == 2 else solve_simplex(gram, scale, tol)
    gw_norm = math.sqrt(max(float(w @ gram @ w), 0.0) + _Dual.SMOOTH * float(gram.diagonal().max()))
    lam = scale / gw_norm if gw_norm > 0 else 0.0
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
        tol: duality gap at which the dual solver stops (more than two tasks), relative to its scale.
    """

    def __init__(self, tasks: list[str], c: float = 0.5, rescale: bool = True, tol: float = 1e-9) -> None:
        super().__init__(tasks)
        if c < 0:
            raise ValueError(f"cagrad: c must be >= 0, got {c}")
        if not 0 < tol < 1:
            raise ValueError(f"cagrad: tol must be in (0, 1), got {tol}")
        self.c, self.rescale, self.tol = c, rescale, tol

    def combine(self, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cagrad_direction(grads, self.c, self.rescale, self.tol)
