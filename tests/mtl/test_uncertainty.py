"""Uncertainty weighting (mmfuse/mtl/uncertainty.py)."""

from __future__ import annotations

import math

import torch

from mmfuse.mtl.uncertainty import UncertaintyWeighting


def test_constant_losses_drive_log_variance_to_log_loss():
    constants = {"a": 0.5, "b": 4.0}
    weighting = UncertaintyWeighting(list(constants))
    opt = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        weights = weighting.backward({t: torch.tensor(v) for t, v in constants.items()}, [])
        opt.step()
    torch.testing.assert_close(
        weighting.log_vars.detach(), torch.tensor([math.log(0.5), math.log(4.0)]), atol=1e-2, rtol=0
    )
    assert weights["a"] > weights["b"]  # weight exp(-s) = 1 / L


def test_initial_weights_are_one_and_gradient_only_in_log_vars():
    weighting = UncertaintyWeighting(["a", "b"])
    loss = torch.nn.Parameter(torch.tensor(2.0))
    weights = weighting.backward({"a": loss * 1, "b": loss * 3}, [])
    assert weights == {"a": 1.0, "b": 1.0}
    assert loss.grad.item() == 4.0
    torch.testing.assert_close(weighting.log_vars.grad, torch.tensor([-1.0, -5.0]))  # 1 - L
