"""`mmfuse compare --out` and `--seeds` (issue 19): a file, a folder of something else, or a huge number of seeds
is one `error:` line (exit 2), never an internal error, and never overwrites an unrelated compare.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmfuse.cli import main
from mmfuse.workbench.compare import plan_compare
from tiny import run_config, write_dataset


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare-out")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(run_config(write_dataset(root, n=12), max_epochs=1)))
    return path


def compare(config: Path, out: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["compare", str(config), "--fusions", "concat", "--out", str(out), *args])
    return rc, capsys.readouterr().err


def test_out_naming_an_existing_file_is_one_line(config: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    rc, err = compare(config, tmp_path / "notes.txt", capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err == (
        f"mmfuse compare: error: --out {tmp_path / 'notes.txt'}: is a file; "
        "name a folder (a new one, or a previous compare's output)\n"
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_out_naming_an_unrelated_folder_is_refused_and_its_compare_md_kept(
    config: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "compare.md").write_text("my own notes")
    rc, err = compare(config, tmp_path, capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"mmfuse compare: error: --out {tmp_path}: the folder holds other files and is not a previous"
    )
    assert (tmp_path / "compare.md").read_text() == "my own notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.md"]


def test_out_may_be_new_empty_or_a_previous_comparison(config: Path, tmp_path: Path) -> None:
    for out in (tmp_path / "new", tmp_path):
        assert plan_compare(config, [], "concat", 1, [], out).out == out
    previous = tmp_path / "previous"
    (previous / "members").mkdir(parents=True)
    (previous / "compare.md").write_text("an earlier comparison's report")
    assert plan_compare(config, [], "concat", 1, [], previous).out == previous


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ("100000000000", "--seeds: at most 1000 seeds (each is a training run per setting), got 100000000000"),
        ("10^11", "--seeds: expected a number of seeds (>= 1), got '10^11'"),
        ("1" + "0" * 5000, "--seeds: "),
    ],
)
def test_a_huge_number_of_seeds_is_one_line(config: Path, tmp_path: Path, capsys, seeds: str, message: str) -> None:
    rc, err = compare(config, tmp_path / "out", capsys, "--seeds", seeds)
    assert rc == 2 and err.count("\n") == 1 and len(err) < 400, err[:400]
    assert err.startswith(f"mmfuse compare: error: {message}"), err[:400]
    assert not (tmp_path / "out").exists()


def test_seeds_past_the_largest_seed_are_one_line(config: Path, tmp_path: Path, capsys) -> None:
    rc, err = compare(config, tmp_path / "out", capsys, "--seeds", "3", "--set", "seed=4294967294")
    assert rc == 2, err
    assert (
        err == "mmfuse compare: error: --seeds: the config's seed 4294967294 + 2 is over the largest seed 4294967295\n"
    )
