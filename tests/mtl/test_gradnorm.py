"""GradNorm (mmfuse/mtl/gradnorm.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmfuse.mtl.gradnorm import GradNorm, last_shared_layer


def test_slower_task_gains_weight_weights_positive_and_sum_to_t(seed):
    layer = nn.Parameter(torch.randn(3, 3))
    weighting = GradNorm(["fast", "slow"], alpha=1.5)
    opt = torch.optim.SGD(weighting.parameters(), lr=0.05)
    for step in range(30):
        q = (layer**2).sum()  # both tasks share the layer; scales control the loss trajectories
        losses = {"fast": q * 0.9**step, "slow": q * 1.0}
        opt.zero_grad()
        layer.grad = None
        weights = weighting.backward(losses, [layer])
        assert sum(weights.values()) == pytest.approx(2.0)
        assert all(w > 0 for w in weights.values())
        opt.step()
    assert weights["slow"] > 1.0 > weights["fast"]


def test_task_losses_do_not_write_into_the_weights_gradient(seed):
    layer = nn.Parameter(torch.randn(2, 2))
    weighting = GradNorm(["a", "b"], alpha=0.0)
    q = (layer**2).sum()
    weighting.backward({"a": q, "b": q}, [layer])  # equal gradient norms: L_grad is at its minimum
    torch.testing.assert_close(weighting.weights.grad, torch.zeros(2))
    torch.testing.assert_close(layer.grad, 4 * layer.detach())  # d(1*q + 1*q)/dW


def test_last_shared_layer_is_the_last_matrix():
    params = [nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3))]
    assert last_shared_layer(params) is params[1]
    assert last_shared_layer(params[2:]) is params[2]
    assert last_shared_layer([]) is None
