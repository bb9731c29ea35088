"""Tests for `mmfuse.fusion.question`: how `relation` and `spatial_film` read their question.

Shapes: B = 2 samples; image 8-d on a 2 x 2 grid; the question 6-d with L = 4 tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mmfuse.cli import main
from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.question import QuestionReader
from mmfuse.fusion.relation import RelationFusion
from mmfuse.fusion.spatial_film import SpatialFiLMFusion
from tiny import run_config, write_dataset

FUSIONS = {"relation": RelationFusion, "spatial_film": SpatialFiLMFusion}


def question(tokens: torch.Tensor, mask: torch.Tensor) -> EncoderOutput:
    """A question whose pooled vector is the mean of its real tokens, as hf_text's `pooling: mean` gives."""
    weights = mask.unsqueeze(-1).float()
    return EncoderOutput(pooled=(tokens * weights).sum(1) / weights.sum(1), tokens=tokens, mask=mask)


@pytest.fixture
def parts() -> tuple[EncoderOutput, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    image = EncoderOutput(pooled=torch.randn(2, 8), tokens=torch.randn(2, 4, 8))
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    return image, torch.randn(2, 4, 6), mask


@pytest.mark.parametrize("name", FUSIONS)
def test_gru_tells_word_order_apart_where_the_mean_cannot(name, parts) -> None:
    """ "the A left of the B" and "the B left of the A" hold the same tokens: same mean, different order."""
    image, tokens, mask = parts
    swapped = tokens.clone()
    swapped[:, [0, 2]] = tokens[:, [2, 0]]  # two real tokens change places
    outputs = {}
    for reader in ("pooled", "gru"):
        fusion = FUSIONS[name]({"image": 8, "text": 6}, 5, question=reader, question_dim=7).eval()
        a, b = (fusion({"image": image, "text": question(t, mask)}).fused for t in (tokens, swapped))
        outputs[reader] = (a - b).abs().max().item()
    assert outputs["pooled"] < 1e-5
    assert outputs["gru"] > 1e-3


def test_gru_ignores_padding_and_reads_an_absent_question_as_zeros(parts) -> None:
    _, tokens, mask = parts
    reader = QuestionReader("gru", 6, 7, "relation")
    padded = tokens.clone()
    padded[0, 3] = 1e3  # a padded position of sample 0
    assert torch.equal(reader(question(tokens, mask), "text"), reader(question(padded, mask), "text"))
    absent = EncoderOutput(pooled=torch.zeros(2, 6), tokens=tokens, mask=mask, present=torch.tensor([True, False]))
    read = reader(absent, "text")
    assert read.shape == (2, 7) and torch.equal(read[1], torch.zeros(7)) and read[0].abs().sum() > 0


def test_the_reader_belongs_to_the_question_modality() -> None:
    fusion = RelationFusion({"image": 8, "text": 6}, 5, question="gru", question_dim=7)
    text = {id(p) for p in fusion.modality_parameters("text")}
    assert {id(p) for p in fusion.reader.parameters()} <= text
    assert not text & {id(p) for p in fusion.modality_parameters("image")}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"question": "lstm"}, "relation question must be one of pooled, gru; got 'lstm'"),
        ({"question": "gru", "question_dim": 0}, "relation question_dim must be an integer >= 1; got 0"),
    ],
)
def test_bad_reader_options_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        RelationFusion({"image": 8, "text": 6}, 5, **kwargs)


def test_gru_on_a_question_without_tokens_is_refused_before_training(tmp_path: Path, capsys) -> None:
    """The question side here is a second image encoder without tokens (a pooled resnet18)."""
    records = write_dataset(tmp_path / "data", n=12)
    cfg = run_config(records, max_epochs=1, cache_dir=str(tmp_path / "cache"))
    cfg["model"] = {
        "encoders": {
            "image": {"name": "conv", "image_size": 16, "depth": 2, "width": 4},
            "photo": {"name": "torchvision", "model": "resnet18", "image_size": 16, "field": "image"},
        },
        "fusion": {"name": "spatial_film", "output_dim": 8, "width": 4, "num_blocks": 1, "question": "gru"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mmfuse train: error: model.fusion.question: gru reads the photo tokens, but model.encoders.photo "
        "(torchvision) gives none; use question: pooled"
    )
    assert not (tmp_path / "run" / "model.safetensors").exists()
