"""The learning-rate schedule: a linear warm-up, then a cosine decay to 0 or a constant (transformers' schedules).

Step k (0-based) of a `warmup_steps`-step warm-up trains at `(k + 1) / warmup_steps` of the lr: the first step
already learns and the last warm-up step trains at the full lr. Then step `warmup_steps + j` trains at
transformers' cosine over the remaining `total_steps - warmup_steps` steps at j (1 at j = 0, 0 at the end), or at
the full lr. Every factor is a closed form of the step (no product of ratios), so a resumed run and a longer
`max_epochs` (the cosine's length is computed from it) see exactly these values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, SequentialLR
from transformers import get_constant_schedule, get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup


def lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int) -> LRScheduler:
    """The per-step scheduler of `optimizer` ("cosine" or "constant" after `warmup_steps` of `total_steps` steps).

    Without warm-up: one `LambdaLR`. With it: a `SequentialLR` of transformers' warm-up, started one step ahead
    (its step 0 would train at lr 0), and the main schedule from step `warmup_steps` on.
    """
    if kind == "cosine":
        main = get_cosine_schedule_with_warmup(optimizer, 0, max(0, total_steps - warmup_steps))
    else:
        main = get_constant_schedule(optimizer)
    if not warmup_steps:
        return main
    warm = get_constant_schedule_with_warmup(optimizer, warmup_steps, last_epoch=0)  # needs main's initial_lr
    return SequentialLR(optimizer, [warm, main], milestones=[warmup_steps])


def upgrade_state(state: dict[str, Any], kind: str, warmup_steps: int) -> dict[str, Any]:
    """The state of `lr_scheduler` after the steps of an older checkpoint's single-`LambdaLR` state.

    Runs written before the schedule came from transformers kept one `LambdaLR` (the same factors at every
    step); with a warm-up the scheduler is now a `SequentialLR`, so the old state is replayed on a scratch
    optimiser with the same base learning rates. Other states are returned as they are.
    """
    if not warmup_steps or "_schedulers" in state or "base_lrs" not in state:
        return state
    steps = int(state["last_epoch"])
    params = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in state["base_lrs"]]
    scratch = torch.optim.SGD(params, lr=1.0)
    sched = lr_scheduler(scratch, kind, warmup_steps, steps + warmup_steps + 1)
    for _ in range(steps):
        scratch.step()
        sched.step()
    return sched.state_dict()
