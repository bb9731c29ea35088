"""`compare_measure.forward_median_ms`: the median forward time from `torch.utils.benchmark`, one thread, no grad."""

from __future__ import annotations

import time
from typing import Any

import torch

from mmfuse.workbench.compare_measure import forward_median_ms


class Sleepy(torch.nn.Module):
    """A model that takes at least `seconds` per forward and records how it was called."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.calls: list[dict[str, Any]] = []
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, inputs: dict[str, torch.Tensor], features: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append({"grad": torch.is_grad_enabled(), "threads": torch.get_num_threads(), "keys": sorted(inputs)})
        time.sleep(self.seconds)
        return self.linear(inputs["x"])


def test_a_slow_forward_is_timed_at_least_repeats_times_on_one_thread_without_grad() -> None:
    model = Sleepy(0.004)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's pool: the timing runs on one thread, then it is back
    try:
        ms = forward_median_ms(model, {"inputs": {"x": torch.zeros(2, 3)}}, torch.device("cpu"), repeats=60)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert ms >= 4.0  # a sleep never ends early; no upper bound (the machine's load decides)
    assert len(model.calls) >= 60  # 60 timed forwards (0.24 s at least) plus the warm-up
    assert all(c == {"grad": False, "threads": 1, "keys": ["x"]} for c in model.calls)
