"""CAGrad (mmfuse/mtl/cagrad.py).

The dual is checked two ways that do not use the solver's own arithmetic: against scipy's SLSQP
(what the official CAGrad code uses) and by the duality gap of the primal direction it implies.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmfuse.mtl.cagrad import CAGrad, cagrad_direction, dual_objective, solve_simplex, solve_two


def primal_gap(grads: np.ndarray, w: np.ndarray, c: float) -> tuple[float, float]:
    """(F(w), F(w) - min_t g_t . d): d = g_0 + c|g_0| g_w/|g_w| is primal-feasible, so this bounds F(w) - F*."""
    g0, gw = grads.mean(0), w @ grads
    radius = c * np.linalg.norm(g0)
    f = float(gw @ g0 + radius * np.linalg.norm(gw))
    d = g0 + radius * gw / np.linalg.norm(gw)
    return f, f - float((grads @ d).min())


def slsqp(grads: np.ndarray, c: float) -> np.ndarray:
    """The official code's solver: scipy SLSQP on the simplex (here with a tight tolerance)."""
    optimize = pytest.importorskip("scipy.optimize")
    t = grads.shape[0]
    gram, b = grads @ grads.T, np.full(t, 1.0 / t)
    radius = c * math.sqrt(gram.mean())

    def objective(x: np.ndarray) -> float:
        return float(x @ gram @ b + radius * math.sqrt(max(x @ gram @ x, 0.0)))

    res = optimize.minimize(
        objective,
        b,
        bounds=[(0, 1)] * t,
        constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},),
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return res.x


def unequal_cases(n: int, seed: int = 0) -> list[tuple[np.ndarray, float]]:
    """Random task gradients (T, 30) with T in 3..8 and one task's gradient 5x larger; c in {0.1, 0.5, 0.9}."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        t = int(rng.integers(3, 9))
        grads = rng.standard_normal((t, 30))
        grads[int(rng.integers(t))] *= 5.0
        cases.append((grads, float(rng.choice([0.1, 0.5, 0.9]))))
    return cases


def solve(grads: np.ndarray, c: float) -> np.ndarray:
    gram = torch.from_numpy(grads @ grads.T)
    return solve_simplex(gram, c * math.sqrt(float(gram.mean()))).numpy()


def test_c_zero_gives_the_mean_gradient():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    direction, coeffs = cagrad_direction(grads, c=0.0)
    torch.testing.assert_close(direction, grads.mean(0))
    torch.testing.assert_close(coeffs, torch.tensor([0.5, 0.5]))
    three = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -3.0]])
    torch.testing.assert_close(cagrad_direction(three, c=0.0)[0], three.mean(0))


def test_two_task_known_case():
    # Orthogonal unit gradients: by symmetry w = (1/2, 1/2), |g_0| = |g_w| = 1/sqrt(2), lambda = c,
    # d = (1 + c) g_0 / (1 + c^2).
    grads = torch.eye(2)
    c = 0.5
    direction, _ = cagrad_direction(grads, c=c)
    torch.testing.assert_close(direction, torch.tensor([0.5, 0.5]) * (1 + c) / (1 + c * c))


def test_general_solver_matches_the_two_task_closed_form(seed):
    for _ in range(10):
        grads = torch.randn(2, 7, dtype=torch.float64)
        grads[0] *= 5
        gram = grads @ grads.T
        scale = 0.5 * float(gram.mean()) ** 0.5
        exact, general = solve_two(gram, scale), solve_simplex(gram, scale)
        f_exact, f_general = float(dual_objective(exact, gram, scale)), float(dual_objective(general, gram, scale))
        assert f_general == pytest.approx(f_exact, rel=1e-9, abs=1e-12)
        assert exact.sum().item() == pytest.approx(1.0) and bool((exact >= 0).all())


def test_dual_matches_scipy_slsqp_with_unequal_gradient_norms():
    worst_f, worst_dir = 0.0, 0.0
    for grads, c in unequal_cases(60):
        w, w_ref = solve(grads, c), slsqp(grads, c)
        assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-12)
        (f, _), (f_ref, _) = primal_gap(grads, w, c), primal_gap(grads, w_ref, c)
        worst_f = max(worst_f, (f - f_ref) / abs(f_ref))
        d = cagrad_direction(torch.from_numpy(grads), c)[0].numpy()
        lam_ref = c * np.linalg.norm(grads.mean(0)) / np.linalg.norm(w_ref @ grads)
        d_ref = (grads.mean(0) + lam_ref * (w_ref @ grads)) / (1 + c * c)
        worst_dir = max(worst_dir, float(np.linalg.norm(d - d_ref) / np.linalg.norm(d_ref)))
    assert worst_f <= 1e-6  # never worse than SLSQP by more than 1e-6 relative
    assert worst_dir <= 1e-4


def test_duality_gap_is_closed_to_1e_6(seed):
    for grads, c in unequal_cases(60, seed=1):
        f, gap = primal_gap(grads, solve(grads, c), c)
        assert 0 <= gap + 1e-12 and gap <= 1e-6 * abs(f)


def test_degenerate_gradients_stay_finite_and_optimal():
    """Fewer parameters than tasks (0 in the convex hull), duplicated and zero task gradients."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        grads = rng.standard_normal((6, 2))
        grads[1] = grads[2]
        grads[3] = 0.0
        grads[0] *= 5
        for c in (0.5, 2.0):
            gram = torch.from_numpy(grads @ grads.T)
            scale = c * math.sqrt(float(gram.mean()))
            w = solve_simplex(gram, scale)
            direction, coeffs = cagrad_direction(torch.from_numpy(grads), c)
            assert torch.isfinite(direction).all() and torch.isfinite(coeffs).all()
            w_ref = torch.from_numpy(slsqp(grads, c))
            f, f_ref = float(dual_objective(w, gram, scale)), float(dual_objective(w_ref, gram, scale))
            assert f <= f_ref + 1e-8 * (float(gram.diagonal().max()) + scale)


def test_direction_does_not_conflict_with_any_task_for_three_tasks(seed):
    grads = torch.tensor([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.1], [0.1, -0.9, 1.0]])
    direction, coeffs = cagrad_direction(grads, c=0.5)
    assert torch.isfinite(direction).all() and bool((coeffs > 0).all())
    assert bool((grads @ direction > 0).all())


def test_options_are_checked():
    with pytest.raises(ValueError, match="c must be"):
        CAGrad(["a", "b"], c=-1.0)
    with pytest.raises(ValueError, match="tol must be"):
        CAGrad(["a", "b"], tol=0.0)
