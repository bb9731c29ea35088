"""`mmfuse compare` planning (nothing trained): members from --fusions x --vary x --seeds, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmfuse.cli import main
from mmfuse.fusion import FUSIONS
from mmfuse.multirun import config_agrees as _agrees
from mmfuse.workbench.compare import parse_vary, plan_compare, split_values
from tiny import run_config, write_dataset


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare-plan")
    cfg = run_config(write_dataset(root, n=12), max_epochs=1)
    cfg["model"]["fusion"] = {"name": "film", "output_dim": 12, "condition_on": "image", "hidden_dim": 24}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_vary_gives_every_combination_for_every_fusion_and_seed(config: Path, tmp_path: Path) -> None:
    plan = plan_compare(
        config,
        ["train.max_epochs=2"],
        ["concat", "film"],
        2,
        ["train.balance.name=ogm_ge,agm", "train.lr=0.1,1e-2"],
        tmp_path,
    )
    got = [(m.seed, m.fusion, m.cfg.train.balance.name, m.cfg.train.lr) for m in plan.members]
    want = [
        (seed, f, b, lr)
        for seed in (0, 1)
        for b in ("ogm_ge", "agm")
        for lr in (0.1, 0.01)  # parsed as YAML, like --set: "1e-2" is the float 0.01
        for f in ("concat", "film")
    ]
    assert got == want
    assert all(m.cfg.train.max_epochs == 2 and m.cfg.seed == m.seed for m in plan.members)
    first = plan.members[0]
    assert first.name == "concat_train.balance.name=ogm_ge_train.lr=0.1_seed0"
    assert first.run_dir == tmp_path / "members" / first.name
    assert first.group == "concat train.balance.name=ogm_ge train.lr=0.1"
    assert len({m.name for m in plan.members}) == len(plan.members) == 16
    assert plan.vary == {"train.balance.name": ["ogm_ge", "agm"], "train.lr": ["0.1", "1e-2"]}


def test_the_configs_fusion_keeps_its_options_and_others_get_only_the_shared_ones(config: Path, tmp_path: Path) -> None:
    plan = plan_compare(config, [], ["film", "concat", "gated"], 1, [], tmp_path)
    fusions = {m.fusion: m.cfg.model.fusion for m in plan.members}
    assert fusions["film"].options == {"output_dim": 12, "condition_on": "image", "hidden_dim": 24}
    assert fusions["concat"].options == {"output_dim": 12}
    assert fusions["gated"].options == {"output_dim": 12}


def test_options_in_braces_go_on_top_of_what_each_fusion_gets(config: Path, tmp_path: Path) -> None:
    plan = plan_compare(config, [], "concat{output_dim: 8, adapters: false},film{hidden_dim: 6},gated", 1, [], tmp_path)
    fusions = {m.fusion: m.cfg.model.fusion for m in plan.members}
    assert fusions["concat"].options == {"output_dim": 8, "adapters": False}
    assert fusions["film"].options == {"output_dim": 12, "condition_on": "image", "hidden_dim": 6}
    assert fusions["gated"].options == {"output_dim": 12}
    # "all" with options for one fusion: that one counts as named (so it must be feedable), the rest as "all"
    tokens = ["model.encoders.image.tokens=true"]
    every = plan_compare(config, tokens, "all,co_attention{num_layers: 1}", 1, [], tmp_path)
    assert every.fusions == FUSIONS.names()
    assert next(m for m in every.members if m.fusion == "co_attention").cfg.model.fusion.options["num_layers"] == 1


def test_all_takes_every_fusion_the_encoders_can_feed_and_says_why_others_are_skipped(
    config: Path, tmp_path: Path
) -> None:
    plan = plan_compare(config, [], ["all"], 1, [], tmp_path)
    # the tiny image encoder gives no tokens: co_attention reads the image's tokens; cross_attention's
    # default (pooled image queries over text tokens) needs only the text's
    # (relation and spatial_film reason over the image's token grid)
    grid = {"co_attention", "relation", "spatial_film"}
    assert plan.skipped.keys() == grid
    assert all("image" in plan.skipped[f] and "tokens" in plan.skipped[f] for f in grid)
    assert plan.fusions == [f for f in FUSIONS.names() if f not in grid]
    with_tokens = plan_compare(config, ["model.encoders.image.tokens=true"], ["all"], 1, [], tmp_path)
    assert with_tokens.skipped == {} and with_tokens.fusions == FUSIONS.names()


def test_split_values_keeps_brackets_and_quotes_together() -> None:
    assert split_values("a, b,[1, 2],{x: 1, y: 2},'p,q'") == ["a", "b", "[1, 2]", "{x: 1, y: 2}", "'p,q'"]
    assert parse_vary(["train.hidden=[1,2],[3]"]) == {"train.hidden": ["[1,2]", "[3]"]}


def test_a_saved_config_agrees_when_it_only_adds_what_training_learned() -> None:
    wanted = {"tasks": {"c": {"kind": "multiclass", "classes": None}}, "model": {"encoders": {"t": {"name": "x"}}}}
    saved = {
        "tasks": {"c": {"kind": "multiclass", "classes": ["a"]}},
        "model": {"encoders": {"t": {"name": "x", "stats": {}}}},
    }
    assert _agrees(saved, wanted)
    assert not _agrees({**saved, "seed": 1}, {**wanted, "seed": 2})
    assert not _agrees({"train": {"balance": {"name": "agm"}}}, {"train": {"balance": None}})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fusions", "concat,nope"], "--fusions: unknown fusion 'nope'; choose from: all, "),
        (["--fusions", ","], "--fusions: name at least one fusion"),
        (["--fusions", "co_attention"], "--fusions: co_attention cannot be used with this config's encoders: "),
        (["--seeds", "0"], "--seeds: must be at least 1, got 0"),
        (["--seeds", "two"], "--seeds: expected a number of seeds (>= 1), got 'two'"),
        (["--vary", "train.lrr=1,2"], "train.lrr: unknown key"),
        (["--vary", "train.lr=0.1,-1"], "--vary train.lr=-1 (fusion concat): train.lr: Input should be greater than 0"),
        (["--vary", "train.lr=0.1,,1"], "an empty value"),
        (["--vary", "train.lr=0.1,0.1"], "a value is listed twice"),
        (["--vary", "train.lr"], "expected KEY=V1,V2,..."),
        (["--vary", "train..lr=1,2"], "expected KEY=V1,V2,..."),
        (["--vary", "train.lr=1", "--vary", "train.lr=2"], "--vary train.lr: given twice"),
        (["--vary", "seed=1,2"], "vary seed with --seeds"),
        (["--vary", "model.fusion.name=sum,concat"], "vary model.fusion.name with --fusions"),
        (["--vary", "train.max_epochs=[1"], "--vary 'train.max_epochs=[1': the value is not valid YAML"),
        (["--stress-limit", "5"], "--stress-limit: needs --stress"),
        (["--fusions", "concat{output_dim: 8"], "the braces of the options do not pair up"),
        (["--fusions", "concat{output_dim: 8}x"], "nothing may follow the options' closing '}'"),
        (["--fusions", "all{output_dim: 8}"], "options need one fusion's name before the '{'"),
        (["--fusions", "{output_dim: 8}"], "options need one fusion's name before the '{'"),
        (["--fusions", "concat{name: sum}"], "'name' is not an option"),
        (["--fusions", "concat{output_dim: [8}"], "options are not a YAML mapping"),
        (["--fusions", "concat{[1]: 2}"], "options are not a YAML mapping"),
        (["--fusions", "concat{1: 2}"], "options must be a mapping of option names to values"),
        (["--fusions", "concat{output_dim: 8},concat{output_dim: 9}"], "concat is given two sets of options"),
        (["--fusions", "concat{nope: 1}"], "--fusions: concat{nope: 1}: nope: unknown option for fusion 'concat'"),
        (
            ["--fusions", "concat{output_dim: -1}"],
            "--fusions: concat{output_dim: -1}: output_dim: must be an integer from 1 to 1048576 (got -1)",
        ),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    base = ["compare", str(config), "--out", str(tmp_path / "out")]
    fusions = [] if "--fusions" in args else ["--fusions", "concat"]
    rc = main([*base, *fusions, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("mmfuse compare: error: "), err
    assert message in err, err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
