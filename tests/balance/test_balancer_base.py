"""Per-modality logits and probes (mmfuse/balance/base.py)."""

from __future__ import annotations

import pytest
import torch

from mmfuse.balance.base import Balancer, decompose_logits, fusion_decomposes, linear_head


@pytest.mark.parametrize("task", ["answer", "flag"])
def test_exact_unimodal_logits_sum_to_full_logits_for_concat(model_factory, batch, task):
    model = model_factory("concat", dropout=0.3).eval()  # head = Dropout + Linear: linear at eval
    inputs, _, _ = batch
    out = model(inputs)
    parts = Balancer(["image", "text"]).unimodal_logits(model, out, task)
    assert set(parts) == {"image", "text"} and parts["image"].shape == out.logits[task].shape
    torch.testing.assert_close(sum(parts.values()), out.logits[task], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(parts["image"], parts["text"])


def test_decomposition_without_fusion_bias(model_factory, batch):
    model = model_factory("concat")
    out = model(batch[0])
    out.fusion.bias, head = None, linear_head(model.heads["answer"])
    fused_wo_bias = out.fusion.fused - model.fusion.fc_out.bias
    torch.testing.assert_close(sum(decompose_logits(head, out.fusion).values()), head(fused_wo_bias))


def test_linear_head_detection(model_factory):
    assert linear_head(model_factory(dropout=0.1).heads["answer"]) is not None
    assert linear_head(model_factory(hidden=[6]).heads["answer"]) is None
    assert linear_head(torch.nn.Linear(2, 2)) is not None


def test_fusion_decomposes_by_dry_run(model_factory):
    model = model_factory("concat").train()
    assert fusion_decomposes(model.fusion) and model.fusion.training
    assert not fusion_decomposes(model_factory("opaque").fusion)


@pytest.mark.parametrize(("fusion", "hidden"), [("opaque", None), ("concat", [6])])
def test_probes_when_no_exact_decomposition(model_factory, batch, fusion, hidden):
    model = model_factory(fusion, hidden=hidden)
    inputs, labels, masks = batch
    balancer = Balancer(["image", "text"])
    out = model(inputs)
    with pytest.raises(RuntimeError, match="setup"):
        balancer.unimodal_logits(model, out, "answer")
    balancer.build_probes(model, "answer")
    parts = balancer.unimodal_logits(model, out, "answer")
    assert {m: p.shape for m, p in parts.items()} == {"image": (8, 3), "text": (8, 3)}
    loss = balancer.aux_loss(out, labels, masks)
    loss.backward()
    assert all(p.grad is not None for p in balancer.probes.parameters())
    assert all(p.grad is None for p in model.encoders.parameters())  # probes read detached features


def test_setup_rejects_other_modalities(model_factory):
    with pytest.raises(ValueError, match="modalities"):
        Balancer(["image", "audio"]).setup(model_factory())


def test_build_balancer_with_nothing_to_act_on_is_a_one_line_config_error(model_factory) -> None:
    from mmfuse.builders import build_balancer
    from mmfuse.config import Component, ConfigError

    model = model_factory("concat", freeze=("image", "text"))
    with pytest.raises(ConfigError, match=r"^train\.balance: ogm_ge has nothing to act on") as err:
        build_balancer(Component(name="ogm_ge"), model)
    assert "\n" not in str(err.value)
    assert build_balancer(Component(name="ogm_ge"), model_factory("concat", freeze=("image", "text"), adapters=True))
