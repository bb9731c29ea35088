"""Inputs the CLI meets (issue 19): only regular files are read, for every input kind; a bad UTF-8 byte is one
skippable row; `predict --input` refuses an empty file and names a misspelt field; weights holding pickles are
one line; `serve` takes a base64 `.npy` embedding as `predict` takes the file.

A FIFO would block a reader forever: `never_read` fails the test if anything opens one for reading, and unblocks
such a reader at once, so a regression fails fast instead of hanging.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mmfuse.cli import main
from tiny import TINY_BERT, run_config, write_dataset


def one_error(capsys: pytest.CaptureFixture, command: str) -> str:
    """The one error line of a refused command (its last line on stderr; info lines may come before), without
    its `mmfuse CMD: error: ` prefix."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("error:") == 1, err
    last = err.splitlines()[-1]
    assert last.startswith(f"mmfuse {command}: error: "), err
    return last.removeprefix(f"mmfuse {command}: error: ")


@contextlib.contextmanager
def never_read(fifo: Path) -> Iterator[None]:
    """Make `fifo` a FIFO for the block (removed after it); fail if anything opens it for reading (such a reader
    is unblocked at once)."""
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    stop, opened = threading.Event(), []

    def unblock() -> None:
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails (ENXIO) while nobody reads
            except OSError:
                time.sleep(0.01)
                continue
            opened.append(fifo)
            os.close(fd)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        fifo.unlink()  # (writing to a FIFO nobody reads would block)
    assert not opened, f"{fifo} (a FIFO) was opened for reading"


# ---------------------------------------------------------------- a tiny run: an embedding, a text, a table
def write_records(root: Path, n: int = 16) -> Path:
    (root / "vectors").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        np.save(root / "vectors" / f"{i}.npy", rng.normal(size=3).astype(np.float32))
        text = "a long question" if i % 2 else "short"
        lines.append(json.dumps({"vec": f"vectors/{i}.npy", "text": text, "weight_kg": 50 + i, "y": float(i % 3)}))
    path = root / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(records: Path, cache: Path, **model: Any) -> dict[str, Any]:
    return {
        "name": "inputs",
        "seed": 0,
        "model": {
            "encoders": {
                "vec": {"name": "embedding", "dim": 3},
                "text": {"name": "hf_text", "config": TINY_BERT, "max_length": 8, "freeze": True},
                "table": {"name": "tabular", "numeric": ["weight_kg"], "dim": 8, "heads": 2},
                **model,
            },
            "fusion": {"name": "concat", "output_dim": 8},
        },
        "tasks": {"y": {"kind": "regression"}},
        "data": {"source": "records", "path": str(records), "val_fraction": 0.25, "batch_size": 8, "num_workers": 0},
        "train": {"max_epochs": 1, "accelerator": "cpu", "progress_bar": False, "cache_dir": str(cache)},
    }


def train(tmp: Path, cfg: dict[str, Any], *extra: str) -> int:
    path = tmp / f"cfg-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["train", str(path), "--out", str(tmp / f"run-{time.monotonic_ns()}"), *extra])


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_records(tmp_path_factory.mktemp("inputs-data"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, records: Path) -> Path:
    tmp = tmp_path_factory.mktemp("inputs-run")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(config(records, tmp / "cache")))
    assert main(["train", str(tmp / "cfg.yaml"), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def predict(run: Path, rows: list[Any] | str, tmp: Path, *extra: str) -> int:
    path = tmp / "in.jsonl"
    if isinstance(rows, str):
        path.write_text(rows)
    else:
        path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return main(["predict", str(run), "--input", str(path), "--root", str(tmp), *extra])


# ---------------------------------------------------------------- item 7: only regular files are read
def test_an_embedding_npy_that_is_a_fifo_is_one_line_not_a_hang(tmp_path: Path, capsys) -> None:
    records = write_records(tmp_path / "data")
    with never_read(records.parent / "vectors" / "3.npy"):
        rc = train(tmp_path, config(records, tmp_path / "cache"))
    assert rc == 2
    assert one_error(capsys, "train") == (
        f"{records}:4: vec: {records.parent / 'vectors' / '3.npy'}: the file is a FIFO (named pipe), not a regular file"
    )


def test_an_image_that_is_a_fifo_is_one_line(tmp_path: Path, capsys) -> None:
    data = write_dataset(tmp_path / "data", n=12)
    with never_read(data.parent / "images" / "5.png"):
        rc = train(tmp_path, run_config(data, max_epochs=1, cache_dir=str(tmp_path / "cache")))
    assert rc == 2
    assert one_error(capsys, "train").endswith(
        f"image '5.png' is a FIFO (named pipe), not a regular file (looked in {data.parent / 'images'})"
    )


def test_a_records_file_that_is_a_fifo_is_one_line(records: Path, run: Path, tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "records.jsonl"
    with never_read(fifo):
        assert train(tmp_path, config(fifo, tmp_path / "cache")) == 2
        assert one_error(capsys, "train") == f"{fifo}: records file is a FIFO (named pipe), not a regular file"
        assert main(["predict", str(run), "--input", str(fifo)]) == 2
        assert one_error(capsys, "predict") == f"{fifo}: records file is a FIFO (named pipe), not a regular file"


def test_a_weights_file_or_model_folder_entry_that_is_a_fifo_is_one_line(records: Path, tmp_path: Path, capsys) -> None:
    weights = tmp_path / "resnet18.pth"
    image = {"name": "torchvision", "model": "resnet18", "image_size": 32, "weights": str(weights), "field": "vec"}
    with never_read(weights):
        assert train(tmp_path, config(records, tmp_path / "cache", image=image)) == 2
    assert one_error(capsys, "train") == (
        f"model.encoders.image: weights file {weights} is a FIFO (named pipe), not a regular file"
    )
    folder = tmp_path / "bert"
    folder.mkdir()
    with never_read(folder / "config.json"):
        assert train(tmp_path, config(records, tmp_path / "cache", text={"name": "hf_text", "model": str(folder)})) == 2
    assert one_error(capsys, "train") == (
        f"model.encoders.text: hf_text model folder {folder} holds 'config.json', which is a FIFO (named pipe), "
        "not a regular file"
    )


# ---------------------------------------------------------------- item 11: weights holding pickles
class NotATensor:
    """Pickled into a weights file: `torch.load(weights_only=True)` refuses it."""


def test_weights_holding_pickled_objects_are_one_line(records: Path, tmp_path: Path, capsys) -> None:
    from torchvision.models import resnet18
    from transformers import BertConfig, BertModel

    weights = tmp_path / "resnet18.pth"
    torch.save({**resnet18().state_dict(), "extra": NotATensor()}, weights)
    image = {"name": "torchvision", "model": "resnet18", "image_size": 32, "weights": str(weights), "field": "vec"}
    assert train(tmp_path, config(records, tmp_path / "cache", image=image)) == 2
    assert one_error(capsys, "train") == (
        f"model.encoders.image: weights file {weights} holds pickled Python objects besides tensors, which mmfuse "
        "never unpickles (that can run code); save only the tensors: torch.save(model.state_dict(), path), or a "
        ".safetensors file"
    )
    folder = tmp_path / "bert"
    bert = BertModel(BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"}))
    bert.config.save_pretrained(folder)
    torch.save({**bert.state_dict(), "extra": NotATensor()}, folder / "pytorch_model.bin")
    assert train(tmp_path, config(records, tmp_path / "cache", text={"name": "hf_text", "model": str(folder)})) == 2
    assert one_error(capsys, "train").startswith(
        f"model.encoders.text: a weights file in hf_text model folder {folder} holds pickled Python objects"
    )


def test_a_truncated_weights_file_is_one_line(records: Path, tmp_path: Path, capsys) -> None:
    weights = tmp_path / "resnet18.safetensors"
    weights.write_bytes(b"")
    image = {"name": "torchvision", "model": "resnet18", "image_size": 32, "weights": str(weights), "field": "vec"}
    assert train(tmp_path, config(records, tmp_path / "cache", image=image)) == 2
    assert one_error(capsys, "train").startswith(
        f"model.encoders.image: weights file {weights} is not readable weights (SafetensorError: "
    )


# ---------------------------------------------------------------- item 11: one bad UTF-8 byte is one bad row
def test_skip_bad_skips_only_the_row_with_a_bad_utf8_byte(records: Path, run: Path, tmp_path: Path, capsys) -> None:
    lines = records.read_bytes().splitlines()
    lines[4] = lines[4].replace(b'"text": "short"', b'"text": "sh\xffort"')
    bad = tmp_path / "records.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    for name in ("vectors",):
        (tmp_path / name).symlink_to(records.parent / name)
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config(bad, tmp_path / "cache")))
    assert main(["train", str(cfg), "--out", str(out), "--skip-bad"]) == 0
    assert (out / "bad_records.txt").read_text() == (
        f"{bad}:5: not UTF-8 text (invalid start byte at byte 36 of the row)\n"
    )
    capsys.readouterr()
    assert main(["predict", str(run), "--input", str(bad), "--skip-bad", "--output", str(tmp_path / "p.jsonl")]) == 0
    assert f"skipped {bad}:5: not UTF-8 text (invalid start byte at byte 36 of the row)" in capsys.readouterr().err
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == len(lines) - 1
    assert main(["predict", str(run), "--input", str(bad)]) == 2  # without --skip-bad: that row, named
    assert one_error(capsys, "predict") == f"{bad}:5: not UTF-8 text (invalid start byte at byte 36 of the row)"


def test_a_config_file_that_is_a_fifo_is_one_line(tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "run.yaml"
    with never_read(fifo):
        assert main(["train", str(fifo), "--out", str(tmp_path / "out")]) == 2
        assert one_error(capsys, "train") == f"{fifo}: is a FIFO (named pipe), not a regular file"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 8: an empty --input
@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_predict_refuses_an_empty_input_file(run: Path, tmp_path: Path, capsys, content: str) -> None:
    capsys.readouterr()
    assert predict(run, content, tmp_path) == 2
    assert one_error(capsys, "predict") == (
        f"{tmp_path / 'in.jsonl'}: no records to predict (the file is empty or holds only blank lines)"
    )


def test_predict_with_skip_bad_where_every_record_is_bad_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    out = tmp_path / "p.jsonl"
    assert (
        predict(run, [{"vec": 3}, {"vec": "nope.npy", "text": ""}], tmp_path, "--skip-bad", "--output", str(out)) == 2
    )
    assert one_error(capsys, "predict") == "no record to predict: all 2 were skipped as bad (listed above)"
    assert not out.exists()


# ---------------------------------------------------------------- item 11: misspelt fields
def test_predict_names_a_misspelt_field(run: Path, records: Path, tmp_path: Path, capsys) -> None:
    vec = str(records.parent / "vectors" / "0.npy")
    good = {"vec": vec, "text": "short", "weight_kg": 60}
    capsys.readouterr()
    for typo, field in (("txet", "text"), ("wieght_kg", "weight_kg")):
        row = {**{k: v for k, v in good.items() if k != field}, typo: good[field]}
        assert predict(run, [good, row], tmp_path, "--allow-outside-root", "--allow-missing") == 2
        assert one_error(capsys, "predict") == (
            f"{tmp_path / 'in.jsonl'}:2: field {typo!r} is not an input of this run; did you mean {field!r}?"
        )
    # labels, ids and other metadata columns are no inputs, and are not refused
    extra = {**good, "y": 1.0, "id": 7, "notes": "from the lab", "texts": "kept"}
    assert predict(run, [good, extra], tmp_path, "--allow-outside-root") == 0
    assert "error" not in capsys.readouterr().err


# ---------------------------------------------------------------- item 11: serve takes a base64 .npy embedding
def test_serve_takes_a_base64_npy_embedding_as_predict_takes_the_file(
    run: Path, records: Path, tmp_path: Path, capsys
) -> None:
    from mmfuse.serve import ServeOptions, Server

    vec = records.parent / "vectors" / "1.npy"
    assert (
        predict(
            run,
            [{"vec": str(vec), "text": "short", "weight_kg": 60}],
            tmp_path,
            "--allow-outside-root",
            "--output",
            str(tmp_path / "p.jsonl"),
        )
        == 0
    )
    want = json.loads((tmp_path / "p.jsonl").read_text())
    want.pop("source")
    server = Server(run, ServeOptions(port=0, device="cpu"))
    server.start()
    try:
        for value in (base64.b64encode(vec.read_bytes()).decode(), np.load(vec).tolist()):
            body = json.dumps({"vec": value, "text": "short", "weight_kg": 60}).encode()
            request = urllib.request.Request(server.url + "/predict", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as reply:
                    status, got = reply.status, json.loads(reply.read())
            except urllib.error.HTTPError as err:
                status, got = err.code, json.loads(err.read())
            assert status == 200, got
            assert got["y"]["value"] == pytest.approx(want["y"]["value"], abs=1e-5)
    finally:
        server.stop()


def test_near_misses_are_typos_and_other_names_are_not() -> None:
    from mmfuse.predict import _near

    assert all(
        _near(a, b) for a, b in [("txet", "text"), ("wieght_kg", "weight_kg"), ("imge", "image"), ("Text", "text")]
    )
    assert not any(_near(a, b) for a, b in [("page", "age"), ("id", "image"), ("label", "text"), ("caption", "text")])
