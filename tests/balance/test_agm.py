"""AGM (mmfuse/balance/agm.py): its coefficient rule against values computed here, step by step."""

from __future__ import annotations

import math

import pytest
import torch

from mmfuse.balance import BALANCERS
from mmfuse.balance.agm import AGM, agm_coefficients


def ce(logits: list[list[float]], labels: list[int]) -> float:
    """Mean cross-entropy by hand."""
    total = 0.0
    for row, y in zip(logits, labels):
        total += -(row[y] - math.log(sum(math.exp(v) for v in row)))
    return total / len(labels)


def test_two_modalities_follow_the_official_rule_over_two_steps() -> None:
    """Official (run/CREMAD_main.py): ratio_a = exp(s_v - s_a), optimal_a = exp(S_v - S_a), k_a = exp(alpha *
    min(optimal_a - ratio_a, 10)); S is the running mean of the scores of all previous steps (0 before any)."""
    alpha = 0.5
    steps = [(0.4, 1.3), (0.9, 1.0)]  # (s_a, s_v) per step
    running = torch.zeros(2)
    seen: list[tuple[float, float]] = []
    for s_a, s_v in steps:
        coeffs, ratios = agm_coefficients(torch.tensor([s_a, s_v]), running, alpha, max_coeff=100.0)
        big_a = sum(a for a, _ in seen) / len(seen) if seen else 0.0
        big_v = sum(v for _, v in seen) / len(seen) if seen else 0.0
        k_a = math.exp(alpha * min(math.exp(big_v - big_a) - math.exp(s_v - s_a), 10))
        k_v = math.exp(alpha * min(math.exp(big_a - big_v) - math.exp(s_a - s_v), 10))
        torch.testing.assert_close(coeffs, torch.tensor([k_a, k_v]))
        torch.testing.assert_close(ratios, torch.tensor([math.exp(s_v - s_a), math.exp(s_a - s_v)]))
        seen.append((s_a, s_v))
        t = len(seen)
        running = running * (t - 1) / t + torch.tensor([s_a, s_v]) / t
    # Step 1: audio ahead (lower loss) against a neutral history: slowed; visual sped up.
    first, _ = agm_coefficients(torch.tensor(steps[0]), torch.zeros(2), alpha, 100.0)
    assert first[0] < 1 < first[1]


def test_cap() -> None:
    coeffs, _ = agm_coefficients(torch.tensor([5.0, 0.0]), torch.tensor([0.0, 5.0]), alpha=1.0, max_coeff=3.0)
    assert float(coeffs.max()) == 3.0


def test_modulate_uses_mono_losses_computed_here_and_keeps_the_history(model_factory, batch) -> None:
    model = model_factory("concat")
    inputs, labels, masks = batch
    agm = BALANCERS.get("agm")(["image", "text"], alpha=0.7)
    agm.setup(model)
    expected_running = torch.zeros(2)
    for step in range(1, 3):
        out = model(inputs)
        # Exact split of concat + linear head, by hand: logits_m = W_h W_m x_m + (W_h b_f + b_h) / 2.
        with torch.no_grad():
            head = model.heads["answer"].net[0]
            blocks = dict(zip(("image", "text"), model.fusion.fc_out.weight.split([5, 3], dim=1)))
            shared = (head.weight @ model.fusion.fc_out.bias + head.bias) / 2
            mono = {m: (out.features[m].pooled @ blocks[m].T @ head.weight.T + shared).tolist() for m in blocks}
        y = labels["answer"].tolist()
        s = torch.tensor([ce(mono["image"], y), ce(mono["text"], y)])
        k, _ = agm_coefficients(s, expected_running, 0.7, 10.0)
        logs = agm.modulate(model, out, labels, masks, epoch=0)
        assert logs["loss/image"] == pytest.approx(float(s[0]), rel=1e-5)
        assert agm.lr_scale["image"] == pytest.approx(float(k[0]), rel=1e-5)
        assert agm.lr_scale["text"] == pytest.approx(float(k[1]), rel=1e-5)
        expected_running = expected_running * (step - 1) / step + s / step
        torch.testing.assert_close(agm.running, expected_running)
    assert int(agm.steps) == 2 and "running" in agm.state_dict()


def test_frozen_without_adapters_is_an_error(model_factory) -> None:
    with pytest.raises(ValueError, match="nothing to act on"):
        AGM(["image", "text"]).setup(model_factory("concat", freeze=("image", "text")))
