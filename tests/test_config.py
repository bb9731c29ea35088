from pathlib import Path

import pytest
import yaml

from mmfuse.builders import build_model
from mmfuse.config import ConfigError, default_config_path, load_config, parse_config
from tiny import tiny_model

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def base() -> dict:
    return {"model": tiny_model(), "tasks": {"y": {"kind": "binary"}}}


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_default_config_is_the_packaged_one() -> None:
    cfg = load_config()
    assert default_config_path().name == "easy_vqa.yaml" and cfg.data.source == "easy_vqa"
    assert set(cfg.tasks) == {"answer", "question_type", "shape", "color"}


def test_unknown_keys_are_named_with_the_allowed_ones() -> None:
    msg = error_of({**base(), "trian": {}})
    assert msg.startswith("trian: unknown key") and "train" in msg
    msg = error_of({**base(), "train": {"max_epoch": 3}})
    assert msg.startswith("train.max_epoch: unknown key") and "max_epochs" in msg
    msg = error_of({**base(), "tasks": {"y": {"kind": "binary", "clases": ["a", "b"]}}})
    assert msg.startswith("tasks.y.clases: unknown option for task kind 'binary'") and "classes" in msg
    msg = error_of({**base(), "tasks": {"y": {"kind": "regression", "los": "l1"}}})
    assert msg.startswith("tasks.y.los: unknown option for task kind 'regression'") and "loss" in msg


def test_wrong_types_and_values_are_named() -> None:
    assert error_of({**base(), "train": {"max_epochs": "many"}}).startswith("train.max_epochs:")
    assert error_of({**base(), "tasks": {"y": {"kind": "ranking"}}}).startswith("tasks.y.kind:")
    assert error_of({**base(), "data": {"batch_size": 0}}).startswith("data.batch_size:")


def test_component_options_are_checked_against_the_registered_class() -> None:
    model = tiny_model()
    model["fusion"]["gate"] = "image"
    assert error_of({**base(), "model": model}).startswith("model.fusion.gate: unknown option for fusion 'concat'")
    model = tiny_model(fusion="attention")
    msg = error_of({**base(), "model": model})
    assert msg.startswith("model.fusion.name: unknown fusion 'attention'") and "cross_attention" in msg
    model = tiny_model()
    model["encoders"]["image"]["image_size"] = "big"
    assert error_of({**base(), "model": model}).startswith("model.encoders.image.image_size:")
    msg = error_of({**base(), "train": {"weighting": {"name": "pcgrad", "sed": 1}}})
    assert msg.startswith("train.weighting.sed: unknown option")


def test_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base()))
    cfg = load_config(path, ["train.max_epochs=3", "model.fusion.output_dim=8", "train.weighting.name=uncertainty"])
    assert cfg.train.max_epochs == 3 and cfg.model.fusion.options["output_dim"] == 8
    assert cfg.train.weighting.name == "uncertainty"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.max_epochs"])
    with pytest.raises(ConfigError, match="train.max_epochs"):
        load_config(path, ["train.max_epochs=lots"])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_builds(path: Path) -> None:
    cfg = load_config(path)
    classes = {
        n: ["a", "b", "c"] for n, t in cfg.tasks.items() if t.classes is None and t.kind in ("multiclass", "multilabel")
    }
    model = build_model(cfg, classes)
    assert set(model.heads) == set(cfg.tasks)
    assert model.fusion.input_dims == {m: e.output_dim for m, e in model.encoders.items()}


def test_task_weights_need_a_weighting_that_uses_them() -> None:
    data = {**base(), "tasks": {"y": {"kind": "binary", "weight": 2.0}}, "train": {"weighting": {"name": "pcgrad"}}}
    assert error_of(data).startswith("tasks.y.weight: per-task weights apply to the equal/static weightings")
    data["train"]["weighting"]["name"] = "equal"
    parse_config(data)


@pytest.mark.parametrize("name", ["type", "train", "to", "half", "float", "cuda", "training", "a.b", ""])
def test_task_and_modality_names_that_cannot_key_a_module_are_one_line(name: str) -> None:
    msg = error_of({**base(), "tasks": {name: {"kind": "binary"}}})
    assert msg.startswith(f"tasks.{name}: task name {name!r} cannot name a module")
    model = tiny_model()
    model["encoders"] = {name: model["encoders"]["text"]}
    assert error_of({**base(), "model": model}).startswith(f"model.encoders.{name}: modality name {name!r}")


def test_encoder_field_task_options_and_the_root_alias() -> None:
    model = tiny_model()
    model["encoders"]["image"]["field"] = "photo"
    data = {**base(), "model": model, "tasks": {"y": {"kind": "regression", "loss": "l1", "field": "price"}}}
    cfg = parse_config({**data, "data": {"image_root": "imgs", "group_by": "photo"}})
    assert cfg.model.encoders["image"].field == "photo" and "field" not in cfg.model.encoders["image"].options
    assert cfg.tasks["y"].options == {"loss": "l1"} and cfg.tasks["y"].field == "price"
    assert cfg.data.root == "imgs" and cfg.data.group_by == "photo" and cfg.data.allow_outside_root is False


@pytest.mark.parametrize(("name", "model"), [("torchvision", "resnet9000"), ("timm", "resnet9000")])
def test_an_unknown_model_name_is_one_config_error(name: str, model: str) -> None:
    data = base()
    data["model"]["encoders"]["image"] = {"name": name, "model": model}
    with pytest.raises(ConfigError) as info:
        build_model(data)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"model.encoders.image: unknown {name}") and "resnet9000" in msg


def test_a_config_from_before_the_data_redesign_still_loads() -> None:
    """mmfuse 0.1 run directories wrote data.image_field / data.text_field: they become the encoders' fields."""
    from mmfuse.config import parse_config

    old = {
        "model": {
            "encoders": {"image": {"name": "torchvision", "model": "resnet18"}, "text": {"name": "hf_text"}},
            "fusion": {"name": "concat", "output_dim": 8},
        },
        "tasks": {"y": {"kind": "binary"}},
        "data": {"source": "records", "path": "x.jsonl", "image_field": "photo", "text_field": "text"},
    }
    cfg = parse_config(old)
    assert cfg.model.encoders["image"].field == "photo"
    assert cfg.model.encoders["text"].field == "text"
    assert "image_field" not in old["data"] or old["data"]["image_field"] == "photo"  # the input is not mutated


# ---------------------------------------------------------------- issue 19: sizes, counts, rates and seeds
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.fusion.output_dim=0", "model.fusion.output_dim: must be an integer from 1 to 1048576 (got 0)"),
        ("model.encoders.image.image_size=0", "model.encoders.image.image_size: must be an integer from 1 to"),
        ("model.encoders.text.max_length=0", "model.encoders.text.max_length: must be an integer from 1 to"),
        ("model.fusion.output_dim=1e9", "model.fusion.output_dim: "),
        ("seed=-1", "seed: Input should be greater than or equal to 0 (got -1)"),
        ("seed=4294967296", "seed: Input should be less than or equal to 4294967295"),
        ("tasks={}", "tasks: Dictionary should have at least 1 item"),
        ("model.encoders={}", "model.encoders: Dictionary should have at least 1 item"),
        ("model.head.hidden_dims=[16,0]", "model.head.hidden_dims.1: Input should be greater than or equal to 1"),
        ("model.head.dropout=1.0", "model.head.dropout: Input should be less than 1"),
        ("tasks.color.weight=-1", "tasks.color.weight: Input should be greater than or equal to 0"),
        ("train.lr=.nan", "train.lr: Input should be a finite number"),
        ("train.weighting={name: dwa, temperature: 0}", "train.weighting.temperature: must be a number > 0 (got 0.0)"),
        ("train.weighting={name: pcgrad, seed: -3}", "train.weighting.seed: must be an integer from 0 to 4294967295"),
        (
            "train.balance={name: modality_dropout, p: 1.5}",
            "train.balance.p: must be a probability in [0, 1] (got 1.5)",
        ),
    ],
)
def test_nonsense_sizes_counts_rates_and_seeds_are_one_line_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture, override: str, message: str
) -> None:
    from mmfuse.cli import main
    from tiny import run_config

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(run_config(tmp_path / "records.jsonl")))
    code = main(["train", str(tmp_path / "cfg.yaml"), "--set", override, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"mmfuse train: error: {message}"), err


def _numeric_options() -> list[tuple[str, str, str, str]]:
    """(registry kind, component name, option, annotation) of every int/float option of every registered class."""
    import inspect
    import typing

    from mmfuse.balance import BALANCERS
    from mmfuse.config import _DERIVED
    from mmfuse.encoders import ENCODERS
    from mmfuse.fusion import FUSIONS
    from mmfuse.mtl import WEIGHTINGS
    from mmfuse.tasks import TASK_KINDS

    found = []
    for registry in (ENCODERS, FUSIONS, WEIGHTINGS, BALANCERS, TASK_KINDS):
        for name in registry.names():
            init = registry.get(name).__init__
            hints = typing.get_type_hints(init)
            for p in inspect.signature(init).parameters.values():
                hint = str(hints.get(p.name, ""))
                if p.name not in _DERIVED and ("int" in hint or "float" in hint):
                    found.append((registry.kind, name, p.name, hint))
    return found


NUMERIC_OPTIONS = _numeric_options()


def test_every_numeric_option_of_every_component_has_a_range() -> None:
    """The class stays closed: a new component's size, count, rate or seed option needs a rule in `option_range`
    (or a place in FREE_OPTIONS when any finite value is meaningful)."""
    from mmfuse.config import FREE_OPTIONS, option_range

    unruled = [f"{kind} {name}.{opt}" for kind, name, opt, _ in NUMERIC_OPTIONS if opt not in FREE_OPTIONS]
    unruled = [u for u in unruled if option_range(u.rsplit(".", 1)[1]) is None]
    assert not unruled, f"add a range rule in config._RANGES for: {unruled}"


@pytest.mark.parametrize(("kind", "name", "option", "hint"), NUMERIC_OPTIONS, ids=lambda v: str(v)[:20])
def test_a_numeric_option_out_of_its_range_is_refused_by_the_schema(kind, name, option, hint) -> None:
    from mmfuse.balance import BALANCERS
    from mmfuse.config import FREE_OPTIONS, Component, component_options, option_range
    from mmfuse.encoders import ENCODERS
    from mmfuse.fusion import FUSIONS
    from mmfuse.mtl import WEIGHTINGS
    from mmfuse.tasks import TASK_KINDS

    registry = {r.kind: r for r in (ENCODERS, FUSIONS, WEIGHTINGS, BALANCERS, TASK_KINDS)}[kind]
    required = {"fusion": {"output_dim": 8}, "encoder": {"dim": 3} if name == "embedding" else {}}.get(kind, {})
    nan = {**required, option: float("nan") if "float" in hint else "x"}
    with pytest.raises(ConfigError, match=rf"^key\.{option}[.:]"):
        component_options(registry, Component(name=name, **nan), "key")
    if option in FREE_OPTIONS:
        return
    low, high, _ = option_range(option)
    below = low - 1 if "int" in hint and "float" not in hint else low - 0.5
    bad = [below, below] if "tuple" in hint else {"a": below} if hint.startswith("dict") else below
    with pytest.raises(ConfigError, match=rf"^key\.{option}: must be "):
        component_options(registry, Component(name=name, **{**required, option: bad}), "key")
