"""`mmfuse pack` and `data: {source: shards}` through the CLI: the same metrics as the JSONL run, the input files
embedded, and every kind of bad shard set refused with one line (exit 2) before anything trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mmfuse.cli import main
from tiny import one_batch_config, write_config, write_dataset

SHARDS = ["--set", "data.source=shards"]


def _config(tmp: Path, records: Path, **changes: object) -> Path:
    return write_config(tmp, one_batch_config(records, changes, cache=False))


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny data set, its JSONL run, and its shards with the images embedded (the images folder then moved away)."""
    tmp = tmp_path_factory.mktemp("pack")
    records = write_dataset(tmp / "data", n=40)
    cfg = _config(tmp, records)
    assert main(["train", str(cfg), "--out", str(tmp / "jsonl_run")]) == 0
    assert main(["pack", str(cfg), "--out", str(tmp / "shards"), "--embed-files"]) == 0
    shutil.move(tmp / "data" / "images", tmp / "images_elsewhere")  # the shards alone must do
    return {"tmp": tmp, "cfg": cfg, "records": records, "shards": tmp / "shards", "jsonl_run": tmp / "jsonl_run"}


def _train_shards(cfg: Path, shards: Path, out: Path, *extra: str) -> int:
    return main(["train", str(cfg), "--out", str(out), *SHARDS, "--set", f"data.path={shards}", *extra])


def test_training_from_shards_gives_the_metrics_of_the_jsonl_run(packed: dict[str, Path], tmp_path: Path) -> None:
    """One batch an epoch holds every training record in both runs, so the steps are the same up to float noise
    (the order inside a batch differs: LitData's chunk order vs a permutation)."""
    manifest = json.loads((packed["shards"] / "mmfuse_manifest.json").read_text())
    assert {s: v["records"] for s, v in manifest["splits"].items()} == {"train": 20, "val": 10, "test": 10}
    assert manifest["learned"]["tasks"]["color"]["classes"] == ["blue", "green", "red"]
    assert manifest["embedded"] == ["image"]
    assert _train_shards(packed["cfg"], packed["shards"], tmp_path / "run") == 0
    ours = json.loads((tmp_path / "run" / "metrics.json").read_text())
    theirs = json.loads((packed["jsonl_run"] / "metrics.json").read_text())
    assert ours["records"] == theirs["records"]
    for split in ("val", "test"):
        for task, metrics in theirs["metrics"][split].items():
            assert ours["metrics"][split][task] == pytest.approx(metrics, abs=1e-5), (split, task)
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["tasks"]["tags"]["classes"] == ["bright", "square"]  # from the manifest
    # evaluate reads the run's resolved config: the shards again
    assert main(["evaluate", str(tmp_path / "run"), "--split", "val", "--json"]) == 0


def _refused(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert all(n in err[0] for n in needles), err[0]
    return err[0]


def test_shards_packed_for_another_config_are_refused(
    packed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = _config(tmp_path, packed["records"], size={"kind": "multiclass"})
    code = _train_shards(other, packed["shards"], tmp_path / "run")
    _refused(capsys, code, "mmfuse_manifest.json: packed for another config", "tasks.size")
    assert not (tmp_path / "run" / "checkpoints").exists()
    renamed = _config(tmp_path, packed["records"], color={"kind": "multiclass", "classes": ["red", "other"]})
    code = _train_shards(renamed, packed["shards"], tmp_path / "run2")
    _refused(capsys, code, "packed for another config", "tasks.color.classes")


def _damaged(packed: dict[str, Path], tmp_path: Path, how: str) -> tuple[Path, Path]:
    copy = tmp_path / "shards"
    shutil.copytree(packed["shards"], copy)
    chunk = next((copy / "train").glob("chunk-*.bin"))
    data = chunk.read_bytes()
    if how == "missing":
        chunk.unlink()
    elif how == "truncated":
        chunk.write_bytes(data[: len(data) // 2])
    else:
        chunk.write_bytes(data[:100] + bytes([data[100] ^ 0x10]) + data[101:])
    return copy, chunk


@pytest.mark.parametrize("how", ["missing", "truncated", "flipped"])
def test_a_damaged_shard_is_named_and_nothing_trains(
    packed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    shards, chunk = _damaged(packed, tmp_path, how)
    code = _train_shards(packed["cfg"], shards, tmp_path / "run")
    word = {"missing": "missing", "truncated": "truncated", "flipped": "damaged"}[how]
    _refused(capsys, code, f"{chunk}: shard {word}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_folder_that_is_not_a_shard_set_is_refused(
    packed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    _refused(capsys, _train_shards(packed["cfg"], tmp_path / "empty", tmp_path / "r"), "no mmfuse_manifest.json")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "mmfuse_manifest.json").write_text("{not json")
    _refused(capsys, _train_shards(packed["cfg"], tmp_path / "bad", tmp_path / "r"), "not a readable manifest")


def test_frozen_feature_cache_over_shards_is_computed_in_the_set(packed: dict[str, Path], tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(packed["shards"], shards)
    assert _train_shards(packed["cfg"], shards, tmp_path / "run", "--set", "train.cache=true") == 0
    assert len(list((shards / "features").glob("*/index.json"))) == 2  # image and text, inside the shard set


def test_pack_refuses_bad_records_and_a_used_folder(
    packed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = write_dataset(tmp_path / "data", n=12)
    (tmp_path / "data" / "images" / "3.png").write_bytes(b"not a png")
    cfg = _config(tmp_path, records)
    _refused(capsys, main(["pack", str(cfg), "--out", str(tmp_path / "s")]), "records.jsonl:4", "image")
    assert not (tmp_path / "s").exists()  # nothing written
    _refused(capsys, main(["pack", str(cfg), "--out", str(packed["shards"])]), "not an empty folder")


@pytest.mark.parametrize("size", ["abc", "0MB", "16XB"])
def test_a_bad_chunk_size_is_refused_before_anything_is_written(
    packed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str
) -> None:
    out = tmp_path / "s"
    _refused(capsys, main(["pack", str(packed["cfg"]), "--out", str(out), "--chunk-bytes", size]), repr(size))
    assert not out.exists()


def test_labels_encoded_with_other_classes_are_refused(tmp_path: Path) -> None:
    """The shards hold class indices: a run whose class list differs (here given in both configs, so nothing was
    learned when packing) would read them as other classes; it is refused in one line instead."""
    from mmfuse.data.shards import ShardError, label_encoding
    from mmfuse.pack import check_labels
    from mmfuse.tasks import build_task

    packed = {"y": build_task("y", "multiclass", classes=["a", "b"]), "v": build_task("v", "regression")}
    manifest = {"labels": label_encoding(packed)}
    check_labels(str(tmp_path), manifest, packed)  # the same encoding: taken
    swapped = {**packed, "y": build_task("y", "multiclass", classes=["b", "a"])}
    with pytest.raises(ShardError) as err:
        check_labels(str(tmp_path), manifest, swapped)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{tmp_path / 'mmfuse_manifest.json'}: packed for another config")
    assert "tasks.y encodes labels with {'kind': 'multiclass', 'classes': ['b', 'a']} here" in line
