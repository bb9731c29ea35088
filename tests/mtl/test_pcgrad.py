"""PCGrad (mmfuse/mtl/pcgrad.py)."""

from __future__ import annotations

import torch

from mmfuse.mtl.pcgrad import project_conflicting


def test_conflicting_gradients_match_closed_form():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1 - (g1.g2)/|g2|^2 g2 = (0.5, 0.5); g2 - (g2.g1)/|g1|^2 g1 = (0, 1)
    torch.testing.assert_close(project_conflicting(grads), torch.tensor([0.5, 1.5]))


def test_non_conflicting_gradients_are_summed():
    grads = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 3.0]])
    torch.testing.assert_close(project_conflicting(grads), grads.sum(0))


def test_projected_gradients_no_longer_conflict_and_seed_fixes_order():
    torch.manual_seed(0)
    grads = torch.randn(4, 10)
    a = project_conflicting(grads, torch.Generator().manual_seed(3))
    b = project_conflicting(grads, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()


def test_zero_gradient_is_ignored():
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(project_conflicting(grads), torch.tensor([1.0, 0.0]))
