"""The CLI never looks like success on a failure, and `cache` touches nothing that is not the cache's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

import mmfuse.cli as cli
import mmfuse.data.cache as cache_mod
from mmfuse.cli import main
from tiny import run_config, write_dataset


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------- unexpected exceptions
def test_an_internal_error_is_one_line_and_exit_1(monkeypatch, capsys) -> None:
    def broken(args) -> int:
        raise RuntimeError("boom\nsecond line of a long message")

    monkeypatch.setattr(cli, "cmd_list", broken)
    assert main(["list"]) == 1
    err = one_line(capsys.readouterr().err)
    assert err == "mmfuse list: internal error: RuntimeError: boom (run with -v for the traceback)"


def test_a_long_internal_error_is_cut_to_300_characters_with_dots(monkeypatch, capsys) -> None:
    def broken(args) -> int:
        raise RuntimeError("x" * 1000)

    monkeypatch.setattr(cli, "cmd_list", broken)
    assert main(["list"]) == 1
    err = one_line(capsys.readouterr().err)
    shown = "RuntimeError: " + "x" * (300 - len("RuntimeError: ") - 3) + "..."
    assert err == f"mmfuse list: internal error: {shown} (run with -v for the traceback)"


def test_with_verbose_the_traceback_is_kept(monkeypatch) -> None:
    monkeypatch.setattr(cli, "cmd_list", lambda args: {}["missing"])
    with pytest.raises(KeyError):
        main(["-v", "list"])


def test_bad_input_errors_still_exit_2(monkeypatch, capsys) -> None:
    from mmfuse.data.records import DataError

    def bad(args) -> int:
        raise DataError("data.jsonl:3: something is wrong")

    monkeypatch.setattr(cli, "cmd_list", bad)
    assert main(["list"]) == 2
    assert one_line(capsys.readouterr().err) == "mmfuse list: error: data.jsonl:3: something is wrong"


# ---------------------------------------------------------------- cache clear / info
def test_cache_clear_refuses_a_folder_that_is_not_a_cache(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "some" / "folder"
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    for action in ("clear", "info"):
        assert main(["cache", action, "--dir", str(folder)]) == 2
        err = one_line(capsys.readouterr().err)
        assert err.startswith(f"mmfuse cache: error: {folder} is not an mmfuse feature cache")
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_cache_clear_says_what_it_kept(tmp_path: Path, capsys) -> None:
    root = tmp_path / "c"
    key = root / "0123456789abcdef0123"
    key.mkdir(parents=True)
    (root / ".mmfuse-cache").write_text("")
    (key / "index.json").write_text("{}")
    (key / "shard_00000.safetensors").write_bytes(b"0" * 100)
    (root / "README.txt").write_text("mine")
    assert main(["cache", "info", "--dir", str(root)]) == 0
    assert "3 files" in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "kept 1 entries the cache did not write: README.txt" in out
    assert sorted(p.name for p in root.iterdir()) == ["README.txt"]


# ---------------------------------------------------------------- corrupt shards end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), n=24)


def train(tmp_path: Path, data: Path, name: str, **train_opts) -> tuple[int, dict]:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(run_config(data, max_epochs=1, **train_opts)))
    rc = main(["train", str(cfg), "--out", str(tmp_path / name)])
    metrics = json.loads((tmp_path / name / "metrics.json").read_text())["metrics"] if rc == 0 else {}
    return rc, metrics


def test_a_run_on_a_corrupt_cache_reencodes_and_matches_a_clean_run(tmp_path: Path, data: Path, capsys) -> None:
    rc, clean = train(tmp_path, data, "clean")
    assert rc == 0
    shards = sorted(Path(os.environ["MMFUSE_CACHE_DIR"]).rglob("shard_*.safetensors"))
    assert len(shards) == 2  # image and text
    for shard in shards:  # flip bytes in the data of one, truncate the other
        raw = bytearray(shard.read_bytes())
        raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])
        shard.write_bytes(bytes(raw) if shard == shards[0] else bytes(raw[: len(raw) // 2]))
    cache_mod._VERIFIED.clear()  # a new process: nothing verified yet
    capsys.readouterr()
    rc, again = train(tmp_path, data, "again")
    assert rc == 0 and again == clean
    err = capsys.readouterr().err
    assert err.count("is corrupt (its sha256 does not match the index); encoding its") == 2
    assert "Traceback" not in err


def test_a_file_as_cache_dir_is_one_line(tmp_path: Path, data: Path, capsys) -> None:
    (tmp_path / "not_a_dir").write_text("x")
    rc, _ = train(tmp_path, data, "run", cache_dir=str(tmp_path / "not_a_dir"))
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mmfuse train: error: feature cache") and "not a directory" in err


def test_a_run_on_a_cache_with_swapped_index_rows_reencodes_and_matches_a_clean_run(
    tmp_path: Path, data: Path, capsys
) -> None:
    """Two rows of each index.json swapped (still valid JSON): detected, re-encoded, same metrics as a clean run."""
    rc, clean = train(tmp_path, data, "clean")
    assert rc == 0
    indexes = sorted(Path(os.environ["MMFUSE_CACHE_DIR"]).rglob("index.json"))
    assert len(indexes) == 2  # image and text
    for index in indexes:
        content = json.loads(index.read_text())
        first, second = list(content["rows"])[:2]
        content["rows"][first], content["rows"][second] = content["rows"][second], content["rows"][first]
        index.write_text(json.dumps(content))
    cache_mod._VERIFIED.clear()  # a new process: nothing verified yet
    capsys.readouterr()
    rc, again = train(tmp_path, data, "again")
    assert rc == 0 and again == clean
    err = capsys.readouterr().err
    assert err.count("(its rows in index.json were edited); encoding its") == 2
    assert "Traceback" not in err
