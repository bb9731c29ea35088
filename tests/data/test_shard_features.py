"""Frozen encoders over a shard set (mmfuse.data.shard_features): each distinct input encoded once for the whole set,
kept inside it, read by row; the metrics of the in-memory cached run; resume after a kill; damaged files encoded
again with a warning naming them; two processes encode nothing twice."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import mmfuse.data.shard_features as sf
from mmfuse.cli import main
from mmfuse.data.cache import CacheError
from mmfuse.data.records import Record
from mmfuse.data.shards import read_manifest, record_item, write_manifest, write_split
from mmfuse.encoders.base import Encoder
from mmfuse.encoders.hf_text import HFTextEncoder
from mmfuse.encoders.torchvision_image import TorchvisionImageEncoder
from tiny import one_batch_config, write_config, write_dataset

SRC = str(Path(__file__).resolve().parents[2] / "src")
N_IMAGES = 40  # write_dataset(n=40): 40 distinct images, 2 distinct texts


class Counting:
    """Counts the inputs a class of encoder encodes (its forward, whichever instance), in this process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type[Encoder]) -> None:
        self.n = 0
        forward = cls.forward

        def counted(encoder: Encoder, inputs: object) -> object:
            out = forward(encoder, inputs)
            self.n += out.pooled.shape[0]
            return out

        monkeypatch.setattr(cls, "forward", counted)


def _config(tmp: Path, records: Path, **data: object) -> Path:
    raw = one_batch_config(records, cache=True, cache_dir=str(tmp / "memory_cache"))
    raw["data"].update(data)
    return write_config(tmp, raw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny data set, its in-memory cached run, and its shards with the images embedded (no features yet)."""
    tmp = tmp_path_factory.mktemp("features")
    records = write_dataset(tmp / "data", n=N_IMAGES)
    cfg = _config(tmp, records)
    assert main(["train", str(cfg), "--out", str(tmp / "memory_run")]) == 0
    assert main(["pack", str(cfg), "--out", str(tmp / "shards"), "--embed-files"]) == 0
    return {"tmp": tmp, "cfg": cfg, "records": records, "shards": tmp / "shards", "memory_run": tmp / "memory_run"}


def _shards_copy(tiny: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(tiny["shards"], dest)
    return dest


def _train(cfg: Path, shards: Path, out: Path, *extra: str) -> int:
    sets = ["--set", "data.source=shards", "--set", f"data.path={shards}", "--set", "train.cache_dir=null"]
    return main(["train", str(cfg), "--out", str(out), *sets, *extra])


def test_cached_features_from_shards_give_the_metrics_of_the_in_memory_cached_run(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shards alone (images moved away: the features come from the embedded bytes); each distinct input is
    encoded once over training and evaluation, and by nothing else."""
    images = Counting(monkeypatch, TorchvisionImageEncoder)
    texts = Counting(monkeypatch, HFTextEncoder)
    shards = _shards_copy(tiny, tmp_path / "shards")
    moved = tiny["tmp"] / "images_elsewhere"
    shutil.move(tiny["tmp"] / "data" / "images", moved)
    try:
        assert _train(tiny["cfg"], shards, tmp_path / "run") == 0
        assert main(["evaluate", str(tmp_path / "run"), "--split", "test", "--json"]) == 0
    finally:
        shutil.move(moved, tiny["tmp"] / "data" / "images")
    assert (images.n, texts.n) == (N_IMAGES, 2)
    ours = json.loads((tmp_path / "run" / "metrics.json").read_text())
    theirs = json.loads((tiny["memory_run"] / "metrics.json").read_text())
    for split in ("val", "test"):
        for task, metrics in theirs["metrics"][split].items():
            assert ours["metrics"][split][task] == pytest.approx(metrics, abs=1e-5), (split, task)
    folders = sorted(p.name.split("-")[0] for p in (shards / "features").iterdir())
    assert folders == ["image", "text"]


def test_pack_features_encodes_once_and_training_encodes_nothing(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = Counting(monkeypatch, TorchvisionImageEncoder)
    shards = tmp_path / "shards"
    assert main(["pack", str(tiny["cfg"]), "--out", str(shards), "--features"]) == 0
    assert "image: 40 distinct inputs, text: 2 distinct inputs" in capsys.readouterr().out
    assert images.n == N_IMAGES
    assert main(["pack", str(tiny["cfg"]), "--out", str(shards), "--features"]) == 0  # on the set: all there
    assert _train(tiny["cfg"], shards, tmp_path / "run") == 0
    assert images.n == N_IMAGES


@pytest.mark.parametrize(
    ("change", "needle"),
    [(["--set", "train.cache=false"], "train.cache is false"), (["--set", "model.encoders.image.freeze=false",
     "--set", "model.encoders.text.freeze=false"], "no encoder of model.encoders is frozen")],
)  # fmt: skip
def test_pack_features_without_a_cached_encoder_is_refused(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], change: list[str], needle: str
) -> None:
    code = main(["pack", str(tiny["cfg"]), "--out", str(tmp_path / "s"), "--features", *change])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "s").exists()  # refused before any record is written


# ---------------------------------------------------------------------- the store itself
def _image_encoder(seed: int = 0) -> TorchvisionImageEncoder:
    torch.manual_seed(seed)
    return TorchvisionImageEncoder("resnet18", image_size=32, freeze=True)


def _store(shards: Path, encoder: Encoder, modality: str = "image") -> sf.ShardFeatures:
    return sf.ShardFeatures(shards, read_manifest(shards), modality, encoder, tokens=False)


def _all_rows(store: sf.ShardFeatures) -> torch.Tensor:
    """Every record's pooled features, split by split in the manifest's order."""
    table, rows = store.build()
    return torch.cat([table.gather(rows[s][torch.arange(n)]).pooled for s, n in _sizes(store).items()])


def _sizes(store: sf.ShardFeatures) -> dict[str, int]:
    return {s: int(store.manifest["splits"][s]["records"]) for s in store.splits}


@pytest.fixture
def small_units(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(sf, "UNIT_ROWS", 4)  # 40 images: 10 units
    yield 4


def test_the_features_are_the_live_encoders_and_the_rows_are_memory_mapped(tiny, tmp_path, small_units) -> None:
    shards = _shards_copy(tiny, tmp_path / "shards")
    encoder = _image_encoder()
    store = _store(shards, encoder)
    table, rows = store.build()
    assert len(table) == N_IMAGES and len(list(store.dir.glob("unit_*.safetensors"))) == 10
    pos = torch.tensor([9, 0, 3, 17, 3])  # across units, one record twice
    got = table.gather(rows["train"][pos]).pooled
    refs = _train_images(shards)
    with torch.no_grad():  # the same records through the live encoder, from the original files
        live = encoder.eval()(encoder.collate([encoder.preprocess(encoder.load(refs[i])) for i in pos.tolist()]))
    assert torch.allclose(got, live.pooled, atol=1e-5)
    assert isinstance(rows["train"], sf.RowMap) and len(rows["train"]) == 20
    assert len(pickle.dumps((table, rows))) < 2000  # file names only: no feature and no per-record index travels


def _train_images(shards: Path) -> list[str]:
    """The image path of each training record, in the shard order."""
    from litdata import StreamingDataset

    from mmfuse.data.shards import item_record

    ds = StreamingDataset(str(shards / "train"), shuffle=False)
    return [str(item_record(ds[i], "train")[0].inputs["image"]) for i in range(len(ds))]


def test_a_killed_pass_resumes_without_encoding_what_was_done(tiny, tmp_path, small_units, monkeypatch) -> None:
    """A process killed (SIGKILL) while encoding its 4th unit: the next pass encodes the other 7 units only."""
    shards = _shards_copy(tiny, tmp_path / "shards")
    script = textwrap.dedent(f"""
        import os, signal, torch
        import mmfuse.data.shard_features as sf
        from mmfuse.data.shards import read_manifest
        from mmfuse.encoders.torchvision_image import TorchvisionImageEncoder
        sf.UNIT_ROWS = 4
        torch.manual_seed(0)
        encoder = TorchvisionImageEncoder("resnet18", image_size=32, freeze=True)
        forward, calls = encoder.forward, []
        def killed_on_the_4th(inputs):
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(inputs)
        encoder.forward = killed_on_the_4th
        sf.ShardFeatures({str(shards)!r}, read_manifest({str(shards)!r}), "image", encoder, tokens=False).build()
    """)
    # the killed process cannot remove its temporary folder: TMPDIR keeps it inside the test's own
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHONPATH": SRC, "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    store = _store(shards, _image_encoder())
    assert sorted(p.name for p in store.dir.glob("unit_*")) == [f"unit_0000{u}.safetensors" for u in range(3)]
    counter = Counting(monkeypatch, TorchvisionImageEncoder)
    resumed = _all_rows(store)
    assert counter.n == N_IMAGES - 3 * 4
    assert not list(store.dir.glob(".*.tmp"))
    fresh = _all_rows(_store(_shards_copy(tiny, tmp_path / "fresh"), _image_encoder()))
    assert torch.allclose(resumed, fresh, atol=1e-6)


@pytest.mark.parametrize("how", ["flipped", "truncated", "missing"])
def test_a_damaged_unit_is_named_and_encoded_again(tiny, tmp_path, small_units, monkeypatch, caplog, how) -> None:
    shards = _shards_copy(tiny, tmp_path / "shards")
    store = _store(shards, _image_encoder())
    before = _all_rows(store)
    unit = store.dir / "unit_00002.safetensors"
    data = unit.read_bytes()
    if how == "flipped":
        unit.write_bytes(data[:-9] + bytes([data[-9] ^ 0x01]) + data[-8:])
    elif how == "truncated":
        unit.write_bytes(data[: len(data) // 2])
    else:
        unit.unlink()
    counter = Counting(monkeypatch, TorchvisionImageEncoder)
    sf._CHECKED.clear()  # as a new process: nothing remembered
    with caplog.at_level(logging.WARNING):
        after = _all_rows(_store(shards, _image_encoder()))
    word = {"flipped": "damaged", "truncated": "truncated", "missing": "missing"}[how]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(f"{unit}: {word}"), warned
    assert counter.n == 4  # that unit only
    assert torch.allclose(before, after, atol=1e-6)


def test_a_damaged_row_map_is_rebuilt_without_encoding(tiny, tmp_path, monkeypatch, caplog) -> None:
    shards = _shards_copy(tiny, tmp_path / "shards")
    store = _store(shards, _image_encoder())
    before = _all_rows(store)
    rows = store.dir / "rows" / "val.npy"
    data = rows.read_bytes()
    rows.write_bytes(data[:-8] + (7).to_bytes(8, "little"))  # the last record pointed at another input
    counter = Counting(monkeypatch, TorchvisionImageEncoder)
    sf._CHECKED.clear()  # as a new process
    with caplog.at_level(logging.WARNING):
        after = _all_rows(_store(shards, _image_encoder()))
    assert any(r.getMessage().startswith(f"{rows}: damaged") for r in caplog.records)
    assert counter.n == 0 and torch.equal(before, after)


def test_features_of_another_encoder_are_never_read(tiny, tmp_path, monkeypatch, caplog) -> None:
    shards = _shards_copy(tiny, tmp_path / "shards")
    first = _store(shards, _image_encoder(seed=0))
    a = _all_rows(first)
    other = _store(shards, _image_encoder(seed=1))  # other weights: another cache_key, another folder
    assert other.dir != first.dir
    counter = Counting(monkeypatch, TorchvisionImageEncoder)
    b = _all_rows(other)
    assert counter.n == N_IMAGES and not torch.allclose(a, b)
    # an index that says it holds another encoder's features: the folder is started over, with a warning
    index = json.loads((first.dir / "index.json").read_text())
    (first.dir / "index.json").write_text(json.dumps({**index, "cache_key": "torchvision|resnet18|other weights"}))
    with caplog.at_level(logging.WARNING):
        c = _all_rows(_store(shards, _image_encoder(seed=0)))
    assert counter.n == 2 * N_IMAGES and torch.allclose(a, c, atol=1e-6)
    assert any("written for another encoder" in r.getMessage() for r in caplog.records)


def test_a_store_that_cannot_be_written_is_one_line(tiny, tmp_path) -> None:
    shards = _shards_copy(tiny, tmp_path / "shards")
    (shards / "features").write_text("not a folder")
    with pytest.raises(CacheError) as err:
        _store(shards, _image_encoder()).build()
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{shards / 'features'}") and "cannot be written there" in line


def test_a_record_without_the_input_is_named(tmp_path: Path) -> None:
    """`pack` refuses such records (an input is required); a shard set written otherwise is named, not guessed."""
    records = [Record({"text": t}, {}, f"r.jsonl:{i + 1}") for i, t in enumerate(["a", None, "b"])]
    split = write_split(tmp_path, "train", (record_item(r, {}, {}) for r in records))
    write_manifest(tmp_path, {"splits": {"train": split}})
    torch.manual_seed(0)
    encoder = HFTextEncoder(config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "intermediate_size": 64}, freeze=True)  # fmt: skip
    with pytest.raises(CacheError, match=r"^r\.jsonl:2: no text; .*train\.cache=false"):
        _store(tmp_path, encoder, "text").build()


def test_two_processes_at_once_encode_each_input_once(tiny, tmp_path, small_units) -> None:
    """Two processes (two ranks started together, as torchrun or SLURM start them) build the same features: one
    encodes under the lock, the other waits and reads; both see the same rows."""
    shards = _shards_copy(tiny, tmp_path / "shards")
    script = textwrap.dedent(f"""
        import time, torch
        import mmfuse.data.shard_features as sf
        from mmfuse.data.shards import read_manifest
        from mmfuse.encoders.torchvision_image import TorchvisionImageEncoder
        sf.UNIT_ROWS = 4
        torch.manual_seed(0)
        encoder = TorchvisionImageEncoder("resnet18", image_size=32, freeze=True)
        forward = encoder.forward
        def slow(inputs):  # the two processes overlap: the second waits on the lock
            time.sleep(0.5)
            return forward(inputs)
        encoder.forward = slow
        store = sf.ShardFeatures({str(shards)!r}, read_manifest({str(shards)!r}), "image", encoder, tokens=False)
        table, rows = store.build()
        pooled = table.gather(rows["test"][torch.arange(10)]).pooled
        print(store.encoded, float(pooled.sum()))
    """)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    encoded, sums = zip(*(out.decode().split() for out, _ in outs))
    assert sorted(int(n) for n in encoded) == [0, N_IMAGES]
    assert sums[0] == sums[1]


def test_an_unusable_index_starts_the_folder_over(tiny, tmp_path, monkeypatch, caplog) -> None:
    shards = _shards_copy(tiny, tmp_path / "shards")
    store = _store(shards, _image_encoder())
    before = _all_rows(store)
    (store.dir / "index.json").write_text('{"format": "mmfuse-shard-features/1", "units": {"0": [1, 2]}')
    counter = Counting(monkeypatch, TorchvisionImageEncoder)
    with caplog.at_level(logging.WARNING):
        after = _all_rows(_store(shards, _image_encoder()))
    assert any(r.getMessage().startswith(f"{store.dir / 'index.json'}: unusable") for r in caplog.records)
    assert counter.n == N_IMAGES and torch.allclose(before, after, atol=1e-6)
