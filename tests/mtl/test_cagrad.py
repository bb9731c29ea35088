"""CAGrad (mmfuse/mtl/cagrad.py)."""

from __future__ import annotations

import pytest
import torch

from mmfuse.mtl.cagrad import cagrad_direction, dual_objective, solve_simplex, solve_two


def test_c_zero_gives_the_mean_gradient():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    direction, coeffs = cagrad_direction(grads, c=0.0)
    torch.testing.assert_close(direction, grads.mean(0))
    torch.testing.assert_close(coeffs, torch.tensor([0.5, 0.5]))


def test_two_task_known_case():
    # Orthogonal unit gradients: by symmetry w = (1/2, 1/2), |g_0| = |g_w| = 1/sqrt(2), lambda = c,
    # d = (1 + c) g_0 / (1 + c^2).
    grads = torch.eye(2)
    c = 0.5
    direction, _ = cagrad_direction(grads, c=c)
    torch.testing.assert_close(direction, torch.tensor([0.5, 0.5]) * (1 + c) / (1 + c * c))


def test_closed_form_matches_projected_gradient(seed):
    for _ in range(5):
        grads = torch.randn(2, 7, dtype=torch.float64)
        gram = grads @ grads.T
        scale = 0.5 * float(gram.mean()) ** 0.5
        exact = solve_two(gram, scale)
        iterative = solve_simplex(gram, scale, steps=500)
        assert float(dual_objective(exact, gram, scale)) <= float(dual_objective(iterative, gram, scale)) + 1e-6
        assert exact.sum().item() == pytest.approx(1.0) and bool((exact >= 0).all())


def test_direction_does_not_conflict_with_any_task_for_three_tasks(seed):
    grads = torch.tensor([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.1], [0.1, -0.9, 1.0]])
    direction, coeffs = cagrad_direction(grads, c=0.5)
    assert torch.isfinite(direction).all() and bool((coeffs > 0).all())
    assert bool((grads @ direction > 0).all())
