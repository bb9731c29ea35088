"""The run name cannot place a run directory outside runs/, and every bad `--set` is one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmfuse.cli import _default_run_dir, main
from mmfuse.config import RUN_NAME_MAX, ConfigError, apply_overrides, default_config_path, load_config

BAD_NAMES = ["../x", "..", ".", "/abs", "a/b", "a\\b", "", "~", ".hidden", "-rf", "a b", "a\nb", "é"]
BAD_NAMES.append("x" * (RUN_NAME_MAX + 1))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_is_not_one_folder_is_refused_in_one_line(name: str, tmp_path: Path) -> None:
    data = yaml.safe_load(default_config_path().read_text())
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**data, "name": name}))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "run.yaml")
    msg = str(err.value)
    assert msg.startswith("name: a run name is one folder name") and "\n" not in msg
    with pytest.raises(ConfigError, match="^name: "):
        _default_run_dir(name)  # the CLI checks again where it builds the path


@pytest.mark.parametrize("name", ["easy_vqa", "run", "my.run-2+b", "R" * RUN_NAME_MAX])
def test_plain_names_are_kept_and_stay_under_runs(name: str) -> None:
    assert load_config(None, [f"name={name}"]).name == name
    out = _default_run_dir(name)
    assert out.parent == Path("runs") and out.name.startswith(f"{name}-")


def test_train_with_an_escaping_name_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["train", "--set", "name=../escaped"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmfuse train: error: name: ") and "\n" not in err
    assert list(tmp_path.iterdir()) == [work] and list(work.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("train.max_epochs=[1", "not valid YAML"),
        ("train.lr={a: 1", "not valid YAML"),
        ("train.lr=!!python/object/apply:os.system [echo hacked]", "not valid YAML"),
        ("train.lr=" + "[" * 10_000 + "]" * 10_000, "--set"),
        ("a..b=1", "empty part"),
        ("train.=1", "empty part"),
        (".x=1", "empty part"),
        ("=3", "expected KEY=VALUE"),
        ("  =3", "expected KEY=VALUE"),
        ("train.max_epochs", "expected KEY=VALUE"),
        ("seed.x=1", "seed is not a section"),
    ],
)
def test_an_unparsable_override_is_one_line_naming_it(override: str, says: str, capsys) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides({"seed": 0, "train": {}}, [override])
    msg = str(err.value)
    assert says in msg and "\n" not in msg and msg.startswith("--set ")
    assert main(["train", "--set", override]) == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("mmfuse train: error: ") and "\n" not in out


def test_a_valid_override_still_parses_as_yaml() -> None:
    data = apply_overrides({"train": {}}, ["train.max_epochs=3", "train.lr=0.001", "model.fusion.name=film"])
    assert data == {"train": {"max_epochs": 3, "lr": 0.001}, "model": {"fusion": {"name": "film"}}}
