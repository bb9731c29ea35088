"""The shared machinery of mmfuse/mtl/base.py: per-task gradients and the one-call surrogate backward."""

from __future__ import annotations

import pytest
import torch

from mmfuse.mtl import WEIGHTINGS
from mmfuse.mtl.base import GradientWeighting, surrogate_backward, task_gradients


def ordinary_grads(model, names):
    """{task: [grad of each shared param]} and the heads' grads from a plain backward of the summed losses."""
    model.zero_grad()
    losses = model.losses()
    per_task = {t: torch.autograd.grad(losses[t], model.shared_params(), retain_graph=True) for t in names}
    sum(losses.values()).backward()
    heads = {n: p.grad.clone() for n, p in model.heads.named_parameters()}
    model.zero_grad()
    return per_task, heads


def test_surrogate_puts_combined_grad_on_shared_and_ordinary_on_heads(two_task, tasks, counting_backward):
    per_task, head_grads = ordinary_grads(two_task, tasks)
    losses = two_task.losses()
    stacked = torch.stack([losses[t] for t in tasks])
    params = two_task.shared_params()
    grads = task_gradients(stacked, params)
    target = torch.randn(grads.shape[1])  # any g*
    backward = counting_backward()
    surrogate_backward(stacked, params, target, grads, backward)
    assert backward.calls == 1
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, target, atol=1e-6, rtol=1e-5)
    for n, p in two_task.heads.named_parameters():
        torch.testing.assert_close(p.grad, head_grads[n])
    flat = torch.cat([g.reshape(-1) for g in per_task["a"]])
    torch.testing.assert_close(grads[0], flat)


def test_gradient_weighting_backward_calls_backward_once_with_combined_grad(two_task, tasks, counting_backward):
    class Halve(GradientWeighting):
        def combine(self, grads):
            return grads.sum(0) / 2, torch.full((grads.shape[0],), 0.5)

    per_task, head_grads = ordinary_grads(two_task, tasks)
    backward = counting_backward()
    weights = Halve(tasks).backward(two_task.losses(), two_task.shared_params(), backward=backward)
    assert backward.calls == 1 and weights == {"a": 0.5, "b": 0.5}
    for i, p in enumerate(two_task.shared_params()):
        torch.testing.assert_close(p.grad, (per_task["a"][i] + per_task["b"][i]) / 2, atol=1e-6, rtol=1e-5)
    for n, p in two_task.heads.named_parameters():
        torch.testing.assert_close(p.grad, head_grads[n])


def test_extra_loss_is_added_once(two_task, tasks):
    probe = torch.nn.Parameter(torch.tensor(2.0))
    for name in ("equal", "pcgrad"):
        probe.grad = None
        WEIGHTINGS.get(name)(tasks).backward(two_task.losses(), two_task.shared_params(), extra_loss=3 * probe)
        assert probe.grad.item() == pytest.approx(3.0)


def test_missing_task_loss_is_a_clear_error(two_task, tasks):
    with pytest.raises(KeyError, match="no loss for task"):
        WEIGHTINGS.get("equal")(tasks).backward({"a": two_task.losses()["a"]}, two_task.shared_params())
