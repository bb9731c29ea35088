"""PCGrad (mmfuse/mtl/pcgrad.py).

"Conflict" is the paper's: g_i . g_j < 0. The checks below compute dot products of the projected
gradients with the original ones in the test, not through the code under test.
"""

from __future__ import annotations

import torch

from mmfuse.mtl.pcgrad import pcgrad_projections, project_conflicting


def conflicts(projected: torch.Tensor, grads: torch.Tensor, eps: float = 1e-9) -> list[tuple[int, int]]:
    """Pairs (i, j), i != j, whose projected g_i' still conflicts with the original g_j (relative eps)."""
    t = grads.shape[0]
    return [
        (i, j)
        for i in range(t)
        for j in range(t)
        if i != j and float(projected[i] @ grads[j]) < -eps * float(projected[i].norm() * grads[j].norm())
    ]


def test_conflicting_gradients_match_closed_form():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1 - (g1.g2)/|g2|^2 g2 = (0.5, 0.5); g2 - (g2.g1)/|g1|^2 g1 = (0, 1)
    torch.testing.assert_close(pcgrad_projections(grads), torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    torch.testing.assert_close(project_conflicting(grads), torch.tensor([0.5, 1.5]))


def test_non_conflicting_gradients_are_summed():
    grads = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 3.0]])
    torch.testing.assert_close(project_conflicting(grads), grads.sum(0))


def test_two_tasks_no_longer_conflict_after_projection(seed):
    n_conflicting = 0
    for _ in range(200):
        grads = torch.randn(2, 16, dtype=torch.float64)
        grads[0] *= 5
        projected = pcgrad_projections(grads)
        assert conflicts(projected, grads) == []
        dot = float(grads[0] @ grads[1])
        if dot < 0:  # each loses exactly its component along the other: orthogonal to it now
            n_conflicting += 1
            assert abs(float(projected[0] @ grads[1])) <= 1e-9 * float(grads[0].norm() * grads[1].norm())
            expected_1 = grads[1] - dot / float(grads[0] @ grads[0]) * grads[0]
            torch.testing.assert_close(projected[1], expected_1)
        else:
            torch.testing.assert_close(projected, grads)
    assert n_conflicting > 50  # the property was exercised


def test_a_task_projected_off_mutually_agreeing_tasks_conflicts_with_none(seed):
    """Task 0 conflicts with every other task and the others agree with each other: whatever the order,
    g_0' conflicts with no task (each later projection adds a positive multiple of a g_k, which agrees
    with every g_j already handled)."""
    for trial in range(50):
        grads = torch.rand(4, 12, dtype=torch.float64)  # non-negative: tasks 1..3 do not conflict
        grads[0] = -5 * torch.rand(12, dtype=torch.float64)  # conflicts with all of them, 5x larger
        projected = pcgrad_projections(grads, torch.Generator().manual_seed(trial))
        assert [pair for pair in conflicts(projected, grads) if pair[0] == 0] == []
        assert abs(float(projected[0] @ grads[1:].sum(0))) > 0  # not projected to nothing


def test_with_three_mutually_conflicting_tasks_a_conflict_can_come_back():
    """The paper's guarantee is for two tasks: g_0 is projected off g_1 and g_2, which conflict with each
    other, and ends conflicting with the one it was projected off first, whatever the order."""
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.5]], dtype=torch.float64)
    for seed in range(6):
        projected = pcgrad_projections(grads, torch.Generator().manual_seed(seed))
        assert (0, 1) in conflicts(projected, grads) or (0, 2) in conflicts(projected, grads)


def test_seed_fixes_the_order():
    torch.manual_seed(0)
    grads = torch.randn(4, 10)
    a = project_conflicting(grads, torch.Generator().manual_seed(3))
    b = project_conflicting(grads, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()


def test_zero_gradient_is_ignored():
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(project_conflicting(grads), torch.tensor([1.0, 0.0]))
