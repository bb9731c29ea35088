"""`mmfuse predict RUN --input SHARD_DIR --split S`: the same output as from the JSONL file of the same records, read a
chunk of records at a time; a folder that is no shard set, a split it lacks, a set packed for other inputs and a damaged
shard are refused with one line (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mmfuse.cli import main
from mmfuse.predict import Predictor
from tiny import run_config, write_dataset

N = {"train": 24, "val": 8, "test": 20}


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run trained on train/val/test JSONL files, the same files packed with the images embedded, and the
    predictions of the test file (made before the images folder is moved away: the shards alone must do)."""
    tmp = tmp_path_factory.mktemp("predict_shards")
    lines = write_dataset(tmp / "data", n=sum(N.values())).read_text().splitlines()
    files, start = {}, 0
    for split, n in N.items():
        files[split] = tmp / "data" / f"{split}.jsonl"
        files[split].write_text("\n".join(lines[start : start + n]) + "\n")
        start += n
    raw = run_config(files["train"], max_epochs=1, cache=False)
    raw["data"].update({"path": None, **{s: str(f) for s, f in files.items()}})
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp / "cfg.yaml"), "--out", str(tmp / "run")]) == 0
    assert main(["pack", str(tmp / "cfg.yaml"), "--out", str(tmp / "shards"), "--embed-files"]) == 0
    out = tmp / "from_jsonl.jsonl"
    assert (
        main(["predict", str(tmp / "run"), "--input", str(files["test"]), "--output", str(out), "--batch-size", "3"])
        == 0
    )
    shutil.move(tmp / "data" / "images", tmp / "images_elsewhere")
    return {"tmp": tmp, "run": tmp / "run", "shards": tmp / "shards", "from_jsonl": out, "test": files["test"]}


def test_predict_from_a_shard_split_writes_what_the_jsonl_file_gives(packed: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "preds.jsonl"
    args = ["predict", str(packed["run"]), "--input", str(packed["shards"]), "--output", str(out), "--batch-size", "3"]
    assert main([*args, "--split", "test"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == N["test"]
    assert json.loads(lines[0])["source"] == f"{packed['test']}:1"
    assert out.read_bytes() == packed["from_jsonl"].read_bytes()
    assert main(args) == 0  # the test split by default
    assert out.read_bytes() == packed["from_jsonl"].read_bytes()


def test_a_shard_split_is_read_a_chunk_of_records_at_a_time(packed: dict[str, Path]) -> None:
    predictor = Predictor(packed["run"], device="cpu")
    split = predictor.shard_split(packed["shards"], "test")
    chunks = list(predictor.shard_records(split, chunk=8))
    assert [len(c) for c in chunks] == [8, 8, 4]
    assert [r.source for c in chunks for r in c] == [f"{packed['test']}:{i}" for i in range(1, N["test"] + 1)]


def _refused(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert all(n in err[0] for n in needles), err[0]


def test_bad_shard_input_is_refused_with_one_line(
    packed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def predict(folder: Path, *extra: str) -> int:
        return main(["predict", str(packed["run"]), "--input", str(folder), "--output", str(tmp_path / "p"), *extra])

    (tmp_path / "empty").mkdir()
    _refused(capsys, predict(tmp_path / "empty"), "not a shard set (no mmfuse_manifest.json)")
    _refused(capsys, predict(packed["shards"], "--split", "dev"), "has no 'dev' split (splits: test, train, val)")
    _refused(
        capsys, main(["predict", str(packed["run"]), "--input", str(packed["test"]), "--split", "test"]), "--split"
    )

    other = tmp_path / "other"
    shutil.copytree(packed["shards"], other)
    manifest = json.loads((other / "mmfuse_manifest.json").read_text())
    manifest["inputs"]["text"]["fields"] = ["caption"]  # packed from a config whose text is another field
    (other / "mmfuse_manifest.json").write_text(json.dumps(manifest))
    _refused(capsys, predict(other), "mmfuse_manifest.json: packed for another config: model.encoders.text")

    damaged = tmp_path / "damaged"
    shutil.copytree(packed["shards"], damaged)
    chunk = next((damaged / "test").glob("chunk-*.bin"))
    data = chunk.read_bytes()
    chunk.write_bytes(data[:50] + bytes([data[50] ^ 1]) + data[51:])
    _refused(capsys, predict(damaged), f"{chunk}: shard damaged")
    assert not (tmp_path / "p").exists()  # nothing written by a refused run
    assert predict(damaged, "--split", "val") == 0  # only the split read is checked
    assert len((tmp_path / "p").read_text().splitlines()) == N["val"]
