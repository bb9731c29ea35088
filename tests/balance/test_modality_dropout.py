"""Modality dropout (mmfuse/balance/modality_dropout.py)."""

from __future__ import annotations

import pytest
import torch

from mmfuse.balance import BALANCERS
from mmfuse.balance.modality_dropout import ModalityDropout


def test_never_drops_every_modality_and_rate_matches_p():
    dropout = ModalityDropout(["image", "text"], p=0.2, seed=0)
    masks = dropout.absent(20000, "cpu", True)
    both = masks["image"] & masks["text"]
    assert not bool(both.any())
    for m in ("image", "text"):  # realised rate p - p^2 / 2 = 0.18 (the re-kept half of the both-dropped 4%)
        assert float(masks[m].float().mean()) == pytest.approx(0.18, abs=0.01)


def test_none_in_eval_and_seeded():
    assert ModalityDropout(["image", "text"]).absent(4, "cpu", False) is None
    a = ModalityDropout(["image", "text"], p=0.5, seed=3).absent(64)
    b = ModalityDropout(["image", "text"], p=0.5, seed=3).absent(64)
    assert all(torch.equal(a[m], b[m]) for m in a)


def test_per_modality_rates_and_already_missing_modalities():
    dropout = ModalityDropout(["image", "text"], p={"image": 1.0}, seed=0)
    missing = {"text": torch.arange(10) < 5}
    masks = dropout.absent(10, None, True, missing=missing)
    assert not bool(masks["text"].any())
    # where text is already missing the image is the only modality left and is kept
    assert torch.equal(masks["image"], ~missing["text"])


def test_unknown_modality_and_bad_rate_are_errors():
    with pytest.raises(ValueError, match="unknown modality"):
        ModalityDropout(["image", "text"], p={"audio": 0.1})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ModalityDropout(["image", "text"], p=1.5)


def test_model_sees_zeros_for_dropped_modalities(model_factory, batch):
    model = model_factory("concat")
    dropout = BALANCERS.get("modality_dropout")(model.modalities, p=0.5, seed=1)
    absent = dropout.absent(8, "cpu", True)
    out = model(batch[0], absent=absent)
    for m in model.modalities:
        assert bool((out.features[m].pooled[absent[m]] == 0).all())
    logs = dropout.modulate(model, out, batch[1], batch[2], epoch=0)
    assert logs["drop/image"] == pytest.approx(float(absent["image"].float().mean()))
