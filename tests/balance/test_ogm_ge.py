"""OGM-GE (mmfuse/balance/ogm_ge.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mmfuse.balance import BALANCERS
from mmfuse.balance.ogm_ge import OGMGE, ogm_coefficients


def test_coefficients_on_hand_made_logits():
    labels = torch.tensor([0, 1])
    logits = {"a": torch.tensor([[2.0, 0.0], [0.0, 2.0]]), "b": torch.tensor([[0.0, 0.0], [0.0, 0.0]])}
    scores = torch.stack([logits[m].softmax(-1).gather(1, labels[:, None]).sum() for m in ("a", "b")])
    coeffs, ratios = ogm_coefficients(scores, alpha=0.5)
    rho = 2 * (1 / (1 + math.exp(-2))) / 1.0  # s_a = 2 sigmoid(2), s_b = 1
    torch.testing.assert_close(ratios[0], torch.tensor(rho))
    torch.testing.assert_close(coeffs, torch.tensor([1 - math.tanh(0.5 * rho), 1.0]))


def test_three_modalities_compare_with_mean_of_others():
    coeffs, ratios = ogm_coefficients(torch.tensor([3.0, 1.0, 1.0]), alpha=0.1)
    torch.testing.assert_close(ratios, torch.tensor([3.0, 0.5, 0.5]))
    torch.testing.assert_close(coeffs, torch.tensor([1 - math.tanh(0.3), 1.0, 1.0]))


def grads_after_backward(model, inputs, labels, masks):
    out = model(inputs)
    sum(model.losses(out.logits, labels, masks).values()).backward()
    return out, {n: p.grad.clone() for n, p in model.encoders.named_parameters()}


def dominate_with_image(model, inputs, labels):
    """Relabel "answer" with the image-only prediction, so that the image modality dominates."""
    out = model(inputs)
    parts = OGMGE(["image", "text"]).unimodal_logits(model, out, "answer")
    labels["answer"] = parts["image"].argmax(-1)


def test_dominant_encoder_scaled_other_untouched(model_factory, batch):
    model = model_factory("concat")
    inputs, labels, masks = batch
    dominate_with_image(model, inputs, labels)
    balancer = OGMGE(["image", "text"], alpha=0.3, noise=False)
    balancer.setup(model)
    out, before = grads_after_backward(model, inputs, labels, masks)
    logs = balancer.modulate(model, out, labels, masks, epoch=0)
    k = logs["coef/image"]
    assert logs["coef/text"] == 1.0 and logs["ratio/image"] > 1
    assert k == pytest.approx(1 - math.tanh(0.3 * logs["score/image"] / logs["score/text"]))
    for name, p in model.encoders.named_parameters():  # proj.weight (2-d), proj.bias, norm.weight (1-d) ...
        expected = before[name] * (k if name.startswith("image.") else 1.0)
        torch.testing.assert_close(p.grad, expected)


@pytest.mark.parametrize("epoch", [1, 3])
def test_nothing_happens_outside_the_window_or_in_eval(model_factory, batch, epoch):
    model = model_factory("concat")
    inputs, labels, masks = batch
    dominate_with_image(model, inputs, labels)
    balancer = BALANCERS.get("ogm_ge")(["image", "text"], start_epoch=2, end_epoch=3)
    out, before = grads_after_backward(model, inputs, labels, masks)
    logs = balancer.modulate(model, out, labels, masks, epoch=epoch)
    assert logs["coef/image"] == 1.0 and logs["coef/text"] == 1.0
    for name, p in model.encoders.named_parameters():
        torch.testing.assert_close(p.grad, before[name])
    model.eval()
    balancer.modulate(model, out, labels, masks, epoch=2)
    for name, p in model.encoders.named_parameters():
        torch.testing.assert_close(p.grad, before[name])


def test_noise_has_the_gradient_scale_and_is_seeded(model_factory, batch):
    inputs, labels, masks = batch
    results = []
    for _ in range(2):
        torch.manual_seed(1)
        model = model_factory("concat")
        balancer = OGMGE(["image", "text"], alpha=0.0, noise=True, seed=5)  # k = 1: only the noise
        out, before = grads_after_backward(model, inputs, labels, masks)
        balancer.modulate(model, out, labels, masks, epoch=0)
        w = model.encoders["image"].proj.weight
        noise = w.grad - before["image.proj.weight"]
        assert 0.2 < float(noise.std() / before["image.proj.weight"].std()) < 5
        results.append(w.grad.clone())
    torch.testing.assert_close(results[0], results[1])


def test_probe_path_and_frozen_encoder_only_logs(model_factory, batch):
    model = model_factory("opaque", freeze=("text",))
    inputs, labels, masks = batch
    balancer = OGMGE(["image", "text"], task="flag", noise=False)
    balancer.setup(model)
    assert balancer.probes is not None and balancer.task == "flag"
    out = model(inputs)
    total = sum(model.losses(out.logits, labels, masks).values()) + balancer.aux_loss(out, labels, masks)
    total.backward()
    logs = balancer.modulate(model, out, labels, masks, epoch=0)
    assert {"coef/image", "coef/text", "score/image", "score/text"} <= set(logs)
    assert all(p.grad is None for p in model.encoders["text"].parameters())


def test_probes_needed_without_setup_is_an_error(model_factory, batch):
    model = model_factory("opaque")
    inputs, labels, masks = batch
    with pytest.raises(RuntimeError, match="setup"):
        OGMGE(["image", "text"]).modulate(model, model(inputs), labels, masks, epoch=0)


def test_unknown_or_unscorable_task_is_an_error(model_factory):
    with pytest.raises(ValueError, match="binary/multiclass"):
        OGMGE(["image", "text"], task="nope").setup(model_factory())
