"""The learning-rate schedule from transformers' schedules gives, at every step, exactly the lr of the formula
mmfuse wrote by hand before (kept here as the reference), also across a save and a resume, a longer run, and the
state of a checkpoint written by the old single-LambdaLR schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch

from mmfuse.train.schedule import lr_scheduler, upgrade_state

LRS = (1e-3, 3e-5, 0.1)  # one param group each: fusion + heads, encoder, another


def old_factor(step: int, warm: int, total: int, kind: str) -> float:
    """The schedule as it was written in `MMFuseModule.configure_optimizers` (the LambdaLR's factor)."""
    if step < warm:
        return (step + 1) / warm
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer() -> torch.optim.Optimizer:
    groups = [{"params": [torch.zeros(2, requires_grad=True)], "lr": lr} for lr in LRS]
    return torch.optim.AdamW(groups, lr=LRS[0])


def _old_scheduler(opt: torch.optim.Optimizer, kind: str, warm: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: old_factor(s, warm, total, kind))


def _lrs(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[list[float]]:
    """The lr of every group at each of `steps` training steps (step, then scheduler step, as the module does)."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def _roundtrip(state: dict) -> dict:
    """Through torch.save and a weights_only load, as a checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


CONFIGS = [(kind, warm, total) for kind in ("cosine", "constant") for warm, total in ((0, 1000), (100, 1000))]
CONFIGS += [("cosine", 7, 50), ("cosine", 1, 10), ("cosine", 5, 5), ("cosine", 0, 1)]


@pytest.mark.parametrize(("kind", "warm", "total"), CONFIGS)
def test_the_same_lr_at_every_step_as_the_old_formula(kind: str, warm: int, total: int) -> None:
    opt_old, opt_new = _optimizer(), _optimizer()
    expected = _lrs(opt_old, _old_scheduler(opt_old, kind, warm, total), total)
    assert _lrs(opt_new, lr_scheduler(opt_new, kind, warm, total), total) == expected  # bit for bit
    assert expected[0][0] == LRS[0] * (1 / warm if warm else 1.0)  # the reference is what it says
    if warm:
        assert expected[warm - 1] == list(LRS)


def _resumed(make, kind: str, warm: int, total: int, at: int, new_total: int) -> list[list[float]]:
    """The lrs of a run of `total` steps saved after `at` of them and resumed for `new_total` (as Lightning does:
    the scheduler is built for the resumed run, then the optimiser and scheduler states are restored)."""
    opt = _optimizer()
    sched = make(opt, kind, warm, total)
    _lrs(opt, sched, at)
    opt_state, sched_state = _roundtrip(opt.state_dict()), _roundtrip(sched.state_dict())
    resumed_opt = _optimizer()
    resumed = make(resumed_opt, kind, warm, new_total)
    resumed_opt.load_state_dict(opt_state)
    resumed.load_state_dict(sched_state)
    return _lrs(resumed_opt, resumed, new_total - at)


@pytest.mark.parametrize(("kind", "at"), [("cosine", 40), ("cosine", 150), ("constant", 40), ("cosine", 100)])
def test_a_resumed_schedule_goes_on_as_before_also_when_stretched(kind: str, at: int) -> None:
    """Saved at step `at` (inside or after the 100-step warm-up): resumed with the same total it goes on as the
    uninterrupted run; with a longer one (a longer max_epochs) it follows the old formula for the new total."""
    warm, total = 100, 400
    straight = _lrs(opt := _optimizer(), lr_scheduler(opt, kind, warm, total), total)
    assert _resumed(lr_scheduler, kind, warm, total, at, total) == straight[at:]
    stretched = _resumed(lr_scheduler, kind, warm, total, at, 700)
    assert stretched == _resumed(_old_scheduler, kind, warm, total, at, 700)
    # the first resumed step keeps the restored lr; every later one is the old formula's for the new total
    assert stretched[1:] == [[lr * old_factor(s, warm, 700, kind) for lr in LRS] for s in range(at + 1, 700)]


@pytest.mark.parametrize(("kind", "at"), [("cosine", 30), ("cosine", 120), ("constant", 120)])
def test_the_state_of_an_old_checkpoint_is_upgraded_and_goes_on_exactly(kind: str, at: int) -> None:
    warm, total = 100, 300
    opt = _optimizer()
    old = _old_scheduler(opt, kind, warm, total)
    _lrs(opt, old, at)
    old_state = _roundtrip(old.state_dict())
    assert "_schedulers" not in old_state
    resumed_opt = _optimizer()
    resumed = lr_scheduler(resumed_opt, kind, warm, total)
    resumed_opt.load_state_dict(_roundtrip(opt.state_dict()))
    resumed.load_state_dict(_roundtrip(upgrade_state(old_state, kind, warm)))
    want = [[lr * old_factor(s, warm, total, kind) for lr in LRS] for s in range(at, total)]
    assert _lrs(resumed_opt, resumed, total - at) == want
    with pytest.raises(KeyError):  # what the upgrade is for: the old state does not fit the new scheduler
        lr_scheduler(_optimizer(), kind, warm, total).load_state_dict(_roundtrip(old_state))


def test_states_without_warmup_or_already_new_pass_through() -> None:
    opt = _optimizer()
    plain = lr_scheduler(opt, "cosine", 0, 10).state_dict()
    assert upgrade_state(plain, "cosine", 0) is plain
    new = lr_scheduler(_optimizer(), "cosine", 3, 10).state_dict()
    assert upgrade_state(new, "cosine", 3) is new
