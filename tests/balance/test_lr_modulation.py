"""A balancer's per-modality coefficient scales the REALISED update of that modality's own parameters.

The trainer multiplies, for one step, the learning rate of the optimiser groups of modality m by
`balancer.lr_scale[m]`. Checked against updates computed here by hand (SGD with momentum, AdamW), after
a first unscaled step so momentum / Adam moments are not trivial.
"""

from __future__ import annotations

import pytest
import torch
from tests.balance.conftest import make_model

from mmfuse.balance import BALANCERS
from mmfuse.mtl import WEIGHTINGS
from mmfuse.train.module import MMFuseModule

LR, WD, MU, K = 0.1, 0.01, 0.9, 0.3
BETAS, EPS = (0.9, 0.999), 1e-8


def make_module(optimizer: str, frozen=()) -> MMFuseModule:
    torch.manual_seed(0)
    # Frozen encoders (the cached-feature case): only the fusion's per-modality adapters can be modulated.
    model = make_model(freeze=frozen, adapters=bool(frozen))
    balancer = BALANCERS.get("ogm_ge")(modalities=model.modalities, noise=False)
    balancer.setup(model)
    weighting = WEIGHTINGS.get("equal")(list(model.tasks))
    return MMFuseModule(model, weighting, balancer, lr=LR, encoder_lr=LR, weight_decay=WD, optimizer=optimizer)


def reference(optimizer: str, p0: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, k: float) -> torch.Tensor:
    """p after step 1 (lr) and step 2 (lr * k), by hand (torch's SGD and AdamW formulas)."""
    if optimizer == "sgd":
        buf = g1 + WD * p0
        p1 = p0 - LR * buf
        buf = MU * buf + g2 + WD * p1
        return p1 - LR * k * buf
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, (g, lr) in enumerate([(g1, LR), (g2, LR * k)], start=1):
        p = p * (1 - lr * WD)
        m, v = BETAS[0] * m + (1 - BETAS[0]) * g, BETAS[1] * v + (1 - BETAS[1]) * g * g
        bc1, bc2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
        p = p - lr / bc1 * m / ((v / bc2).sqrt() + EPS)
    return p


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("frozen", [(), ("image", "text")])
def test_realised_update_shrinks_by_the_coefficient(optimizer, frozen) -> None:
    module = make_module(optimizer, frozen)
    opt = module._optimizer()
    params = [p for g in opt.param_groups for p in g["params"]]
    image = {id(p) for g in opt.param_groups if g.get("modality") == "image" for p in g["params"]}
    assert image, "the image modality has its own parameter group"
    gen = torch.Generator().manual_seed(1)
    p0 = [p.detach().clone() for p in params]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(2)]
    for step, scale in enumerate([{}, {"image": K, "text": 1.0}]):
        module.balancer.lr_scale = scale
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        with module._balanced_lr(opt):
            opt.step()
    for p, init, g1, g2 in zip(params, p0, *grads):
        k = K if id(p) in image else 1.0
        torch.testing.assert_close(p.detach(), reference(optimizer, init, g1, g2, k), rtol=1e-5, atol=1e-6)
    assert all(g["lr"] == LR for g in opt.param_groups), "the scaled lr is restored after the step"


def test_unscaled_and_scaled_differ_by_exactly_k_under_adamw() -> None:
    """The point of the change: under AdamW, scaling gradients barely moves the update; scaling the lr does."""
    deltas = {}
    for k in (1.0, K):
        module = make_module("adamw")
        opt = module._optimizer()
        w = module.model.encoders["image"].proj.weight
        w.grad = torch.full_like(w, 0.5)
        before = w.detach().clone()
        module.balancer.lr_scale = {"image": k}
        with module._balanced_lr(opt):
            opt.step()
        deltas[k] = w.detach() - before
    torch.testing.assert_close(deltas[K], K * deltas[1.0])
