"""Every registered weighting on a tiny two-task model: one backward call, finite gradients everywhere."""

from __future__ import annotations

import pytest
import torch

from mmfuse.mtl import WEIGHTINGS


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_weighting_backwards_once_with_finite_grads(name, two_task, tasks, counting_backward):
    weighting = WEIGHTINGS.get(name)(tasks)
    for epoch in range(3):
        two_task.zero_grad()
        backward = counting_backward()
        weights = weighting.backward(two_task.losses(), two_task.shared_params(), backward=backward)
        assert backward.calls == 1
        assert set(weights) == set(tasks) and all(torch.isfinite(torch.tensor(w)) for w in weights.values())
        for p in [*two_task.shared.parameters(), *two_task.heads.parameters(), *weighting.parameters()]:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        weighting.on_epoch_end(epoch, {t: float(v) for t, v in two_task.losses().items()})
    restored = WEIGHTINGS.get(name)(tasks)
    restored.load_state_dict(weighting.state_dict())
