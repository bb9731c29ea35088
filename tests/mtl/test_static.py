"""Static weighting (mmfuse/mtl/static.py) and equal weighting (mmfuse/mtl/equal.py)."""

from __future__ import annotations

import pytest
import torch

from mmfuse.mtl.equal import EqualWeighting
from mmfuse.mtl.static import StaticWeighting


def test_static_weights_scale_the_losses_and_default_to_one():
    loss = torch.nn.Parameter(torch.tensor(1.0))
    weights = StaticWeighting(["a", "b", "c"], weights={"a": 0.5, "c": 2.0}).backward(
        {"a": loss * 1, "b": loss * 1, "c": loss * 1}, []
    )
    assert weights == {"a": 0.5, "b": 1.0, "c": 2.0}
    assert loss.grad.item() == pytest.approx(3.5)


def test_static_unknown_task_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['colour'\]"):
        StaticWeighting(["answer", "color"], weights={"colour": 2.0})


def test_equal_weights_are_one():
    loss = torch.nn.Parameter(torch.tensor(1.0))
    assert EqualWeighting(["a", "b"]).backward({"a": loss * 2, "b": loss * 3}, []) == {"a": 1.0, "b": 1.0}
    assert loss.grad.item() == 5.0
