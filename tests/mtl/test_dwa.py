"""Dynamic Weight Average (mmfuse/mtl/dwa.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mmfuse.mtl.dwa import DynamicWeightAverage


def run_epochs(weighting, history):
    seen = []
    for epoch, losses in enumerate(history):
        weights = weighting.backward({t: torch.tensor(v, requires_grad=True) for t, v in losses.items()}, [])
        seen.append(weights)
        weighting.on_epoch_end(epoch, losses)
    return seen


def test_weights_match_hand_computation_and_sum_to_t():
    history = [{"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 1.8}, {"a": 0.4, "b": 1.0}, {"a": 0.3, "b": 0.9}]
    weighting = DynamicWeightAverage(["a", "b"], temperature=2.0)
    seen = run_epochs(weighting, history)
    assert seen[0] == {"a": 1.0, "b": 1.0} and seen[1] == {"a": 1.0, "b": 1.0}
    for e in (2, 3):
        r = [history[e - 1][t] / history[e - 2][t] for t in ("a", "b")]
        z = [math.exp(x / 2.0) for x in r]
        expected = {t: 2 * v / sum(z) for t, v in zip(("a", "b"), z)}
        assert seen[e] == pytest.approx(expected, rel=1e-6)
        assert sum(seen[e].values()) == pytest.approx(2.0)
    assert seen[2]["b"] > seen[2]["a"]  # b's loss fell slower in epoch 1


def test_state_survives_a_checkpoint_and_missing_task_gets_ratio_one():
    weighting = DynamicWeightAverage(["a", "b", "c"])
    weighting.on_epoch_end(0, {"a": 1.0, "b": 1.0, "c": 1.0})
    weighting.on_epoch_end(1, {"a": 0.5, "b": 2.0})  # no labelled sample of "c" in epoch 1
    restored = DynamicWeightAverage(["a", "b", "c"])
    restored.load_state_dict(weighting.state_dict())
    torch.testing.assert_close(restored.weights, weighting.weights)
    expected = 3 * torch.softmax(torch.tensor([0.5, 2.0, 1.0]) / 2, 0)
    torch.testing.assert_close(restored.weights, expected)
