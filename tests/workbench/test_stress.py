"""Stress evaluation of a finished tiny run: `Stress`, `sweep` and `mmfuse evaluate --drop/--corrupt`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mmfuse.cli import main
from mmfuse.train.run import evaluate
from mmfuse.workbench.corrupt import absent_mask
from mmfuse.workbench.stress import Condition, Stress, drop_condition, flat, sweep
from tiny import run_config, write_dataset


def train_tiny(tmp: Path, **model: object) -> Path:
    records = write_dataset(tmp / "data", n=40)
    cfg = run_config(records, cache_dir=str(tmp / "feature-cache"))  # module scope: name a private cache
    cfg["model"].update(model)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp / "cfg.yaml"), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("stress"))


@pytest.fixture(scope="module")
def stress(trained: Path) -> Stress:
    return Stress(trained)


@pytest.fixture(scope="module")
def clean(stress: Stress) -> dict[str, float]:
    return flat(stress.evaluate())


def test_clean_stress_evaluation_is_mmfuse_evaluate(trained: Path, clean: dict[str, float]) -> None:
    assert clean == flat(evaluate(trained))


@pytest.mark.parametrize(
    "modality, kind", [("image", "noise"), ("image", "blur"), ("image", "occlude"), ("image", "absent"),
                       ("text", "word_dropout"), ("text", "shuffle"), ("text", "absent")]
)  # fmt: skip
def test_severity_0_equals_the_clean_evaluation_exactly(stress: Stress, clean: dict, modality: str, kind: str) -> None:
    assert flat(stress.evaluate([Condition(modality, kind, 0.0)])) == clean


@pytest.mark.parametrize(
    "modality, kind, severity", [("image", "noise", 0.5), ("image", "blur", 1.0), ("image", "occlude", 0.5),
                                 ("image", "absent", 1.0), ("text", "word_dropout", 1.0), ("text", "shuffle", 1.0),
                                 ("text", "absent", 1.0)]
)  # fmt: skip
def test_each_kind_changes_the_metrics(stress: Stress, clean: dict, modality: str, kind: str, severity: float) -> None:
    stressed = flat(stress.evaluate([Condition(modality, kind, severity)]))
    assert set(stressed) == set(clean)
    assert stressed["size/mae"] != clean["size/mae"]  # a regression error moves with any change of the outputs


def all_rows(table, rows: torch.Tensor) -> torch.Tensor:
    return table.gather(rows).pooled


def test_corrupted_inputs_are_encoded_again_never_read_from_the_cache(stress: Stress) -> None:
    cached = all_rows(stress.features.tables["image"], stress.features.rows["test"]["image"])  # (N, D) clean, cached
    # The re-encoding path itself, on uncorrupted inputs (severity 0 is the identity): the cached features.
    table, rows, missing = stress.encode_corrupted("image", [Condition("image", "noise", 0.0)])
    assert not missing.any()
    assert torch.allclose(all_rows(table, rows), cached, atol=1e-5)
    table, rows, _ = stress.encode_corrupted("image", [Condition("image", "noise", 0.3)])
    assert (all_rows(table, rows) - cached).abs().max() > 1e-3
    text = all_rows(stress.features.tables["text"], stress.features.rows["test"]["text"])
    table, rows, _ = stress.encode_corrupted("text", [Condition("text", "word_dropout", 0.5)])
    assert (all_rows(table, rows) - text).abs().max() > 1e-3
    features, absent = stress.stressed_features([Condition("image", "noise", 0.3)])
    assert features.tables["image"] is not stress.features.tables["image"] and not absent
    assert features.tables["text"] is stress.features.tables["text"]  # the other modality keeps its clean features


def test_a_dropped_modality_has_no_say(stress: Stress) -> None:
    dropped = flat(stress.evaluate([drop_condition("image")]))
    assert dropped == flat(stress.evaluate([Condition("image", "noise", 1.0), drop_condition("image")]))
    assert dropped == flat(stress.evaluate([Condition("image", "absent", 1.0)]))


def test_absent_marks_the_drawn_fraction_of_records(stress: Stress) -> None:
    _, absent = stress.stressed_features([Condition("text", "absent", 0.5)])
    assert torch.equal(absent["text"], absent_mask(len(stress.records), 0.5, stress.seed))


def test_corruptions_are_deterministic_given_the_seed(trained: Path, stress: Stress) -> None:
    cond = [Condition("image", "noise", 0.5), Condition("text", "absent", 0.5)]
    first = flat(stress.evaluate(cond))
    assert flat(stress.evaluate(cond)) == first
    assert flat(Stress(trained, seed=0).evaluate(cond)) == first
    assert flat(Stress(trained, seed=1).evaluate(cond)) != first


def test_corrupted_features_are_cached_apart_and_read_back_by_another_run_of_the_encoder(
    trained: Path, stress: Stress, monkeypatch: pytest.MonkeyPatch
) -> None:
    cond = [Condition("image", "noise", 0.65)]
    first = flat(stress.evaluate(cond))
    again = Stress(trained)  # a fresh process's view: another member of a comparison, a second sweep
    calls: list[int] = []
    encoder = again.model.encoders["image"]
    monkeypatch.setattr(encoder, "forward", lambda x, f=encoder.forward: calls.append(1) or f(x))
    assert flat(again.evaluate(cond)) == pytest.approx(first, abs=1e-6)
    assert calls == []  # read back, not encoded
    moved = flat(again.evaluate([Condition("image", "noise", 0.45)]))  # another severity: its own entries
    assert calls and moved != first
    # never the clean features' folder: the clean evaluation is unchanged after the corrupted ones were cached
    assert flat(Stress(trained).evaluate()) == flat(stress.evaluate())


def test_uncached_run_sees_the_same_corruption(trained: Path, stress: Stress, clean: dict) -> None:
    root = Path(yaml.safe_load((trained / "config.yaml").read_text())["train"]["cache_dir"])
    before = sorted(p.name for p in root.iterdir())
    uncached = Stress(trained, overrides=["train.cache=false"])
    assert not uncached.features.tables  # every input goes through its encoder
    assert flat(uncached.evaluate()) == pytest.approx(clean, abs=1e-5)
    cond = [Condition("image", "occlude", 0.5)]
    got = flat(uncached.evaluate(cond))
    assert sorted(p.name for p in root.iterdir()) == before  # the cache off: corrupted features are not kept either
    assert got == pytest.approx(flat(stress.evaluate(cond)), abs=1e-5)


def test_sweep_grid_clean_and_limit(trained: Path) -> None:
    out = sweep(trained, kinds={"image": ["noise", "absent"]}, severities=[0.0, 0.5, 1.0], seed=3, limit=6)
    grid = [(c["modality"], c["kind"], c["severity"]) for c in out["conditions"]]
    assert grid == [("image", k, s) for k in ("noise", "absent") for s in (0.0, 0.5, 1.0)]
    small = Stress(trained, limit=6, seed=3)
    assert len(small.records) == 6
    assert out["clean"] == flat(small.evaluate())
    by = {(c["kind"], c["severity"]): c["metrics"] for c in out["conditions"]}
    assert by[("noise", 0.0)] == by[("absent", 0.0)] == out["clean"]
    assert by[("absent", 1.0)] == flat(small.evaluate([drop_condition("image")]))  # severity 1 of absent: dropped
    assert by[("noise", 0.5)] == flat(small.evaluate([Condition("image", "noise", 0.5)]))
    assert out["higher_is_better"]["size/mae"] is False and out["higher_is_better"]["color/accuracy"] is True


def test_sweep_defaults_to_every_applicable_kind(trained: Path) -> None:
    out = sweep(trained, severities=[1.0], limit=3)
    kinds = {(c["modality"], c["kind"]) for c in out["conditions"]}
    assert kinds == {("image", k) for k in ("noise", "blur", "occlude", "absent")} | {
        ("text", k) for k in ("word_dropout", "shuffle", "absent")
    }


def test_sweep_refuses_a_kind_that_does_not_apply(trained: Path) -> None:
    with pytest.raises(ValueError, match="'blur' does not apply to 'text'"):
        sweep(trained, kinds={"text": ["blur"]}, severities=[0.5], limit=2)


def test_cli_drop_and_corrupt(trained: Path, stress: Stress, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(trained), "--drop", "image", "--json"]) == 0
    assert flat(json.loads(capsys.readouterr().out)) == flat(stress.evaluate([drop_condition("image")]))
    args = ["--corrupt", "image=blur:0.5", "--corrupt", "text=shuffle:1", "--seed", "0"]
    assert main(["evaluate", str(trained), *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith("condition: --corrupt image=blur:0.5, --corrupt text=shuffle:1 (seed 0)\n")
    assert "size" in out and "mae" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--corrupt", "sound=noise:0.1"], "--corrupt sound=noise:0.1: the run has no modality 'sound'"),
        (["--drop", "sound"], "--drop sound: the run has no modality 'sound'"),
        (["--corrupt", "image=fog:0.1"], "unknown corruption kind 'fog'"),
        (["--corrupt", "image=noise:1.5"], "severity 1.5 is out of range [0, 1]"),
        (["--corrupt", "image=noise:-0.1"], "severity -0.1 is out of range [0, 1]"),
        (["--corrupt", "image=noise:nan"], "severity nan is out of range [0, 1]"),
        (["--corrupt", "text=blur:0.5"], "'blur' does not apply to 'text' (a text input"),
        (["--corrupt", "image=word_dropout:0.5"], "'word_dropout' does not apply to 'image'"),
        (["--corrupt", "image:noise=0.1"], "expected MODALITY=KIND:SEVERITY"),
        (["--corrupt", "image=noise:high"], "severity 'high' is not a number"),
        (["--seed", "3"], "--seed only acts with --drop or --corrupt"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(trained: Path, capsys, args: list[str], message: str) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(trained), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmfuse evaluate: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_token_fusion_is_stressed_through_its_tokens(tmp_path: Path) -> None:
    run = train_tiny(tmp_path, fusion={"name": "cross_attention", "output_dim": 16})
    stress = Stress(run)
    assert stress.features.tables["text"].has_tokens
    clean = flat(stress.evaluate())
    table, rows, _ = stress.encode_corrupted("text", [Condition("text", "shuffle", 0.0)])
    cached = stress.features.tables["text"].gather(stress.features.rows["test"]["text"])
    again = table.gather(rows)
    assert torch.allclose(again.tokens, cached.tokens, atol=1e-5) and torch.equal(again.mask, cached.mask)
    for cond in (Condition("text", "shuffle", 1.0), Condition("image", "occlude", 0.5), drop_condition("text")):
        assert flat(stress.evaluate([cond]))["size/mae"] != clean["size/mae"], cond
