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


def true_class_scores_by_hand(model, inputs, labels) -> dict[str, float]:
    """s_m = sum_i softmax(logits_m)_i[y_i] with logits_m computed here from the weights: concat fusion
    (column blocks W_m, bias b_f) and a linear head (W_h, b_h): logits_m = W_h W_m x_m + (W_h b_f + b_h) / 2."""
    feats = {m: model.encoders[m](inputs[m]).pooled for m in ("image", "text")}
    w_f, b_f = model.fusion.fc_out.weight, model.fusion.fc_out.bias
    blocks = dict(zip(("image", "text"), w_f.split([5, 3], dim=1)))
    head = model.heads["answer"].net[0]
    shared = (head.weight @ b_f + head.bias) / 2
    scores = {}
    for m, x in feats.items():
        logits = x @ blocks[m].T @ head.weight.T + shared  # (B, 3)
        scores[m] = float(logits.softmax(-1)[torch.arange(len(x)), labels["answer"]].sum())
    return scores


def test_coefficient_from_scores_computed_here_and_gradients_left_alone(model_factory, batch):
    model = model_factory("concat")
    inputs, labels, masks = batch
    dominate_with_image(model, inputs, labels)
    balancer = OGMGE(["image", "text"], alpha=0.3, noise=False)
    balancer.setup(model)
    out, before = grads_after_backward(model, inputs, labels, masks)
    balancer.modulate(model, out, labels, masks, epoch=0)
    with torch.no_grad():
        s = true_class_scores_by_hand(model, inputs, labels)
    assert s["image"] > s["text"]
    expected = 1 - math.tanh(0.3 * s["image"] / s["text"])
    assert balancer.lr_scale["image"] == pytest.approx(expected, rel=1e-5)
    assert balancer.lr_scale["text"] == 1.0
    for name, p in model.encoders.named_parameters():  # the coefficient acts on the lr, not on the gradient
        torch.testing.assert_close(p.grad, before[name])


@pytest.mark.parametrize("epoch", [1, 3])
def test_nothing_happens_outside_the_window_or_in_eval(model_factory, batch, epoch):
    model = model_factory("concat")
    inputs, labels, masks = batch
    dominate_with_image(model, inputs, labels)
    balancer = BALANCERS.get("ogm_ge")(["image", "text"], start_epoch=2, end_epoch=3)
    out, before = grads_after_backward(model, inputs, labels, masks)
    logs = balancer.modulate(model, out, labels, masks, epoch=epoch)
    assert logs["coef/image"] == 1.0 and logs["coef/text"] == 1.0
    assert balancer.lr_scale == {"image": 1.0, "text": 1.0}
    for name, p in model.encoders.named_parameters():
        torch.testing.assert_close(p.grad, before[name])
    model.eval()
    balancer.modulate(model, out, labels, masks, epoch=2)
    assert balancer.lr_scale == {"image": 1.0, "text": 1.0}
    for name, p in model.encoders.named_parameters():
        torch.testing.assert_close(p.grad, before[name])


def test_ge_noise_std_is_the_gradients_own_std():
    """Mean 10, std 2: the noise must have std 2 (the gradient's std), not its RMS (~10.2) or norm."""
    p = torch.nn.Parameter(torch.zeros(20000))
    p.grad = 10 + 2 * torch.randn(20000, generator=torch.Generator().manual_seed(0))
    g = p.grad.clone()
    OGMGE(["image", "text"], seed=3).add_noise([p])
    noise = p.grad - g
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(noise.std()) == pytest.approx(float(g.std()), rel=0.03)


def test_noise_reaches_every_modality_parameter_and_is_seeded(model_factory, batch):
    inputs, labels, masks = batch
    results = []
    for _ in range(2):
        torch.manual_seed(1)
        model = model_factory("concat", freeze=("text",), adapters=True)
        balancer = OGMGE(["image", "text"], alpha=0.0, noise=True, seed=5)
        balancer.setup(model)
        out = model(inputs)
        sum(model.losses(out.logits, labels, masks).values()).backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        balancer.modulate(model, out, labels, masks, epoch=0)
        changed = {n for n, p in model.named_parameters() if p.grad is not None and not torch.equal(p.grad, before[n])}
        assert changed == {n for n in before if n.startswith(("encoders.image.", "fusion.adapter."))}
        results.append(model.fusion.adapter["text"].weight.grad.clone())
    torch.testing.assert_close(results[0], results[1])


def test_probe_path_scores_and_nothing_to_act_on_is_an_error(model_factory, batch):
    model = model_factory("opaque")
    inputs, labels, masks = batch
    balancer = OGMGE(["image", "text"], task="flag", noise=False)
    balancer.setup(model)
    assert balancer.probes is not None and balancer.task == "flag"
    out = model(inputs)
    total = sum(model.losses(out.logits, labels, masks).values()) + balancer.aux_loss(out, labels, masks)
    total.backward()
    logs = balancer.modulate(model, out, labels, masks, epoch=0)
    assert {"coef/image", "coef/text", "score/image", "score/text"} <= set(logs)
    with pytest.raises(ValueError, match=r"nothing to act on for modality\(ies\) \['text'\]"):
        OGMGE(["image", "text"], task="flag").setup(model_factory("opaque", freeze=("text",)))


def test_probes_needed_without_setup_is_an_error(model_factory, batch):
    model = model_factory("opaque")
    inputs, labels, masks = batch
    with pytest.raises(RuntimeError, match="setup"):
        OGMGE(["image", "text"]).modulate(model, model(inputs), labels, masks, epoch=0)


def test_unknown_or_unscorable_task_is_an_error(model_factory):
    with pytest.raises(ValueError, match="binary/multiclass"):
        OGMGE(["image", "text"], task="nope").setup(model_factory())
