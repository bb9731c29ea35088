"""Every registered balancer against the contract in `mmfuse.balance.base`, with its default options, through the
trainer's step on a tiny two-modality model: `setup`, `absent`, the forward, `aux_loss`, one backward, `modulate`,
`lr_scale`. A newly registered balancer is tested here the moment it is registered."""

from __future__ import annotations

import math

import pytest
import torch

from mmfuse.balance import BALANCERS, Balancer
from mmfuse.registry import describe

NAMES = BALANCERS.names()


def build(name: str, model) -> Balancer:
    balancer = BALANCERS.get(name)(modalities=list(model.modalities))
    balancer.setup(model)
    return balancer


def step(balancer: Balancer, model, batch, epoch: int = 0) -> dict[str, float]:
    """One training step as `mmfuse.train.module` runs it; returns `modulate`'s logs."""
    inputs, labels, masks = batch
    n = next(iter(inputs.values())).shape[0]
    absent = balancer.absent(n, "cpu", True)
    out = model(inputs, absent=absent)
    loss = sum(model.losses(out.logits, labels, masks).values())
    extra = balancer.aux_loss(out, labels, masks)
    model.zero_grad()
    (loss if extra is None else loss + extra).backward()
    return balancer.modulate(model, out, labels, masks, epoch)


@pytest.mark.parametrize("name", NAMES)
def test_declares_what_the_trainer_reads(name: str, model_factory) -> None:
    model = model_factory()
    balancer = build(name, model)
    assert isinstance(balancer, Balancer) and describe(type(balancer)), "the first docstring line is listed"
    assert balancer.ready and balancer.modalities == list(model.modalities)
    for task in (balancer.task, balancer.probe_task):
        assert task is None or task in model.tasks
    assert isinstance(balancer.lr_scale, dict) and isinstance(balancer.drops_modalities, bool)


@pytest.mark.parametrize("name", NAMES)
def test_a_training_step_runs_and_keeps_everything_finite(name: str, model_factory, batch) -> None:
    model = model_factory()
    balancer = build(name, model)
    for epoch in range(2):
        logs = step(balancer, model, batch, epoch)
        assert all(isinstance(k, str) and math.isfinite(float(v)) for k, v in logs.items()), logs
        assert set(balancer.lr_scale) <= set(model.modalities)
        assert all(math.isfinite(k) and k >= 0 for k in balancer.lr_scale.values())
        for pname, p in [*model.named_parameters(), *balancer.named_parameters()]:
            assert p.grad is None or torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_absent_hides_whole_samples_of_known_modalities_only_in_training(name: str, model_factory) -> None:
    model = model_factory()
    balancer = build(name, model)
    assert balancer.absent(8, "cpu", training=False) is None
    absent = balancer.absent(8, "cpu", training=True)
    if absent is None:
        return
    assert set(absent) <= set(model.modalities)
    assert all(v.dtype == torch.bool and v.shape == (8,) for v in absent.values())
    hidden = torch.stack([absent.get(m, torch.zeros(8, dtype=torch.bool)) for m in model.modalities])  # (M, B)
    assert not hidden.all(0).any(), "a sample must keep at least one modality"


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips(name: str, model_factory, batch) -> None:
    model = model_factory()
    balancer = build(name, model)
    step(balancer, model, batch)
    restored = build(name, model)
    restored.load_state_dict(balancer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), balancer.state_dict().values()))
