"""`mmfuse serve` on a tiny trained run: the HTTP API, dynamic batching, limits, the CLI and the demo page in a
real browser. Servers listen on 127.0.0.1 on ephemeral ports and are always stopped (fixture finalisers); every
HTTP call has a timeout. Expected predictions come from `mmfuse.predict.Predictor` on the image FILES (what
`mmfuse predict` prints), while the server only ever gets the bytes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from mmfuse.cli import main
from mmfuse.predict import Predictor
from mmfuse.serve import Limits, ServeOptions, Server
from mmfuse.serve.app import json_response
from mmfuse.serve.batcher import Batcher
from tiny import run_config, write_dataset

TIMEOUT = 60
QUESTION = "is this a square?"
LIMITS = Limits(max_body_bytes=200_000, max_records=5, max_pixels=100 * 100)


# ---------------------------------------------------------------------------------------------- helpers
def call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON reply) of one HTTP request; 4xx/5xx replies are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def predict(url: str, payload: Any) -> tuple[int, Any]:
    return call("POST", url + "/predict", json.dumps(payload).encode(), {"Content-Type": "application/json"})


def multipart(fields: dict[str, str | bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body: bytes values as file parts, strings as plain fields."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if isinstance(value, bytes):
            head = f'Content-Disposition: form-data; name="{name}"; filename="{name}.png"\r\nContent-Type: image/png'
            parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal structure, labels and keys; floats within 1e-5 (a batch may sum in another order)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), where
    else:
        assert got == want, where


def stats(url: str) -> dict[str, Any]:
    return call("GET", url + "/stats")[1]


def batch_sizes_since(before: dict[str, Any], after: dict[str, Any]) -> dict[int, int]:
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    return {k: v for k, v in sizes.items() if v}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), n=24)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    cfg = run_config(data, max_epochs=1, cache_dir=str(tmp / "feature-cache"))
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp / "cfg.yaml"), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def images(data: Path) -> list[Path]:
    return [data.parent / "images" / f"{i}.png" for i in range(6)]


@pytest.fixture(scope="module")
def expected(run_dir: Path, images: list[Path]) -> list[dict[str, Any]]:
    """`mmfuse predict`'s results for each image with QUESTION, one record at a time, from the files."""
    predictor = Predictor(run_dir, "cpu")
    out = []
    for image in images:
        records, _ = predictor.check(predictor.records_from_fields({"image": str(image), "text": QUESTION}))
        out.append(predictor.predict(records, batch_size=1)[0])
    return out


@contextmanager
def running(run_dir: Path, **options: Any) -> Iterator[Server]:
    server = Server(run_dir, ServeOptions(port=0, device="cpu", **options))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(run_dir: Path) -> Iterator[Server]:
    """The main server: small limits so each one is cheap to cross, short batching wait."""
    with running(run_dir, max_batch=4, max_wait_ms=20, limits=LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def url(server: Server) -> str:
    return server.url


# ---------------------------------------------------------------------------------------------- the API
def test_health_and_info_describe_the_run(url: str, run_dir: Path) -> None:
    assert call("GET", url + "/health") == (200, {"status": "ok"})
    status, info = call("GET", url + "/info")
    assert status == 200
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert info["name"] == "tiny"
    assert {t: v["kind"] for t, v in info["tasks"].items()} == {t: v["kind"] for t, v in config["tasks"].items()}
    assert info["tasks"]["color"]["classes"] == config["tasks"]["color"]["classes"] == ["blue", "green", "red"]
    assert info["inputs"]["image"] == {"fields": ["image"], "modality": "image", "upload": True, "required": True}
    assert info["inputs"]["text"]["upload"] is False
    assert info["metrics"] == json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert info["serving"]["max_batch"] == 4 and info["serving"]["max_records"] == LIMITS.max_records
    assert "batches" in info["stats"]


def test_one_record_as_json_and_as_multipart_equals_mmfuse_predict(url, images, expected) -> None:
    status, got = predict(url, {"image": b64(images[0]), "text": QUESTION})
    assert status == 200
    assert_same(got, expected[0])
    body, kind = multipart({"image": images[0].read_bytes(), "text": QUESTION})
    status, got = call("POST", url + "/predict", body, {"Content-Type": kind})
    assert status == 200
    assert_same(got, expected[0])
    probs = got["color"]["probabilities"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5) and got["color"]["label"] == max(probs, key=probs.get)


def test_a_list_of_records_answers_in_order(url, images, expected) -> None:
    payload = [{"image": b64(images[i]), "text": QUESTION} for i in (2, 0, 1)]
    payload[1]["image"] = "data:image/png;base64," + payload[1]["image"]  # a data URL works too
    status, got = predict(url, payload)
    assert status == 200 and isinstance(got, list) and len(got) == 3
    for result, i in zip(got, (2, 0, 1)):
        assert_same(result, expected[i], f"record {i}")


def big_png(side: int) -> bytes:
    path = Path(f"/tmp/mmfuse-test-{uuid.uuid4().hex}.png")
    try:
        Image.new("RGB", (side, side), (10, 20, 30)).save(path)
        return path.read_bytes()
    finally:
        path.unlink()


BAD_REQUESTS = {
    "unknown field": ({"image": "", "text": QUESTION, "price": 3}, 422, "does not read 'price'"),
    "missing input": ({"text": QUESTION}, 422, "no image (field 'image')"),
    "undecodable image": ({"image": base64.b64encode(b"not a png").decode(), "text": QUESTION}, 422, "decoded"),
    "a server path": ({"image": "/etc/passwd", "text": QUESTION}, 422, "never opens a path"),
    "a path that is valid base64": ({"image": "/etc/passwd/", "text": QUESTION}, 422, "cannot be decoded"),
    "too many records": ([{"text": QUESTION}] * 6, 413, "limit is 5"),
    "no record": ([], 422, "no record"),
    "not an object": (["a text"], 422, "expected an object"),
    "text not a string": ({"image": "", "text": 5}, 422, "must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_with_one_line(url: str, images: list[Path], case: str) -> None:
    payload, status, words = BAD_REQUESTS[case]
    if isinstance(payload, dict) and payload.get("image") == "":
        payload = {**payload, "image": b64(images[0])}
    got_status, reply = predict(url, payload)
    assert got_status == status, reply
    assert set(reply) == {"error"} and words in reply["error"] and "\n" not in reply["error"]
    assert "root:" not in reply["error"]  # nothing of /etc/passwd was read


def test_limits_on_size_and_form(url: str, server: Server) -> None:
    image = base64.b64encode(big_png(101)).decode()  # 10,201 pixels: over the 10,000 limit
    status, reply = predict(url, {"image": image, "text": QUESTION})
    assert status == 413 and "10,000 pixels" in reply["error"]
    big = json.dumps({"text": "x" * 300_000}).encode()
    status, reply = call("POST", url + "/predict", big, {"Content-Type": "application/json"})
    assert status == 413 and "limit of 200,000 bytes" in reply["error"]

    def chunks_slowly() -> Any:  # no Content-Length: chunked; the pause lets the server answer mid-upload
        yield from (b'{"text": "', b"x" * 150_000, b"x" * 150_000)
        time.sleep(0.3)
        yield b'"}'

    chunks = chunks_slowly()
    status, reply = call("POST", url + "/predict", chunks, {"Content-Type": "application/json"})
    assert status == 413 and "over the limit" in reply["error"]
    for body, kind, code in (
        (b"{not json", "application/json", 400),
        (b"[" * 50_000, "application/json", 400),
        (b"\xff\xfe garbage", "application/json", 400),
        (b"text=hi", "text/plain", 415),
        (b"--x\r\nbroken", "multipart/form-data; boundary=x", 422),  # parses as an empty form
    ):
        status, reply = call("POST", url + "/predict", body, {"Content-Type": kind})
        assert status == code and set(reply) == {"error"}, (body[:20], reply)
    body, kind = multipart({"text": b"bytes where a text belongs", "image": big_png(8)})
    status, reply = call("POST", url + "/predict", body, {"Content-Type": kind})
    assert status == 422 and "not a file input" in reply["error"]
    assert call("GET", url + "/nowhere")[0] == 404
    assert call("GET", url + "/health") == (200, {"status": "ok"})  # still alive
    assert not list(server.upload_dir.iterdir())  # every upload was removed


# ---------------------------------------------------------------------------------------------- batching
def concurrently(url: str, payloads: list[Any]) -> list[tuple[int, Any]]:
    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(lambda p: predict(url, p), payloads))


def test_concurrent_clients_are_batched_together(run_dir, images, expected) -> None:
    with running(run_dir, max_batch=4, max_wait_ms=800) as server:
        url = server.url
        before = stats(url)
        start = time.monotonic()
        assert predict(url, {"image": b64(images[0]), "text": QUESTION})[0] == 200
        assert time.monotonic() - start >= 0.8  # alone, it waited --max-wait-ms for company
        middle = stats(url)
        assert batch_sizes_since(before, middle) == {1: 1}
        replies = concurrently(url, [{"image": b64(images[i % 4]), "text": QUESTION} for i in range(4)])
        after = stats(url)
        assert batch_sizes_since(middle, after) == {4: 1}  # four clients, one forward pass
        for i, (status, got) in enumerate(replies):
            assert status == 200
            assert_same(got, expected[i % 4], f"client {i}")
        replies = concurrently(url, [[{"image": b64(images[i]), "text": QUESTION}] * 3 for i in range(3)])
        assert all(status == 200 and len(got) == 3 for status, got in replies)
        sizes = batch_sizes_since(after, stats(url))
        assert max(sizes) <= 4 and sum(k * v for k, v in sizes.items()) == 9  # requests are never split


def test_batching_off_and_two_workers(run_dir, images, expected) -> None:
    with running(run_dir, max_batch=1, max_wait_ms=0, workers=2) as server:
        url = server.url
        replies = concurrently(url, [{"image": b64(images[i % 6]), "text": QUESTION} for i in range(12)])
        for i, (status, got) in enumerate(replies):
            assert status == 200
            assert_same(got, expected[i % 6], f"client {i}")
        after = stats(url)
        assert after["batch_sizes"] == {"1": 12}
        assert len(after["batches_per_worker"]) == 2 and sum(after["batches_per_worker"]) == 12
        assert all(n > 0 for n in after["batches_per_worker"]), after  # both workers took batches


def test_batcher_policy_without_a_model() -> None:
    """Batches never exceed max_batch records, never split a request, answer each request with its own results;
    a request larger than max_batch is a batch of its own; a failed batch fails only its own requests."""
    seen: list[list[Any]] = []

    def echo(records: list[Any]) -> list[dict[str, Any]]:
        seen.append(list(records))
        if "boom" in records:
            raise RuntimeError("the model failed")
        time.sleep(0.01)
        return [{"echo": r} for r in records]

    batcher = Batcher([echo], max_batch=4, max_wait_s=0.05)
    sizes = [1, 3, 2, 4, 1, 6, 2, 1]
    requests = [[f"{i}.{j}" for j in range(n)] for i, n in enumerate(sizes)]

    async def drive() -> list[Any]:
        return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)

    try:
        results = asyncio.run(drive())
        for request, result in zip(requests, results):
            assert result == [{"echo": r} for r in request]
        for batch in seen:
            firsts = {r.split(".")[0] for r in batch}
            assert len(batch) <= 4 or len(firsts) == 1, batch  # only a single oversized request exceeds 4
            for i in firsts:  # whole requests only
                assert [r for r in batch if r.startswith(f"{i}.")] == requests[int(i)]
        assert sum(len(b) for b in seen) == sum(sizes)
        assert len(seen) < len(sizes)  # some requests shared a forward pass
        assert batcher.stats.snapshot()["records"] == sum(sizes)

        async def with_failure() -> list[Any]:
            return await asyncio.gather(batcher.submit(["boom"]), return_exceptions=True)

        (failed,) = asyncio.run(with_failure())
        assert isinstance(failed, RuntimeError)
        assert asyncio.run(drive())[0] == [{"echo": "0.0"}]  # the worker lives on
    finally:
        batcher.close()


def test_a_request_that_fails_to_prepare_fails_alone() -> None:
    seen: list[list[Any]] = []

    def prepare(payload: str) -> list[str]:
        if payload == "bad":
            raise ValueError("undecodable")
        return [payload]

    def echo(records: list[Any]) -> list[dict[str, Any]]:
        seen.append(list(records))
        return [{"echo": r} for r in records]

    batcher = Batcher([echo], max_batch=8, max_wait_s=0.2, prepare=prepare)

    async def drive() -> list[Any]:
        return await asyncio.gather(*(batcher.submit(p, 1) for p in ("a", "bad", "b")), return_exceptions=True)

    try:
        a, bad, b = asyncio.run(drive())
    finally:
        batcher.close()
    assert a == [{"echo": "a"}] and b == [{"echo": "b"}] and isinstance(bad, ValueError)
    assert seen == [["a", "b"]]  # one batch, without the bad request


def test_json_replies_are_strict() -> None:
    assert json_response({"a": float("nan"), "b": [float("inf"), 1.5]}).body == b'{"a":null,"b":[null,1.5]}'


# ---------------------------------------------------------------------------------------------- command line
def test_serve_refuses_bad_options_and_a_busy_port(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a finished run directory" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(run_dir), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


@pytest.mark.slow
def test_the_cli_serves_until_interrupted(run_dir: Path, images: list[Path], expected) -> None:
    cmd = [sys.executable, "-m", "mmfuse.cli", "serve", str(run_dir), "--port", "0", "--max-batch", "3"]
    cmd += ["--max-wait-ms", "2", "--max-records", "7"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # "serving RUN at http://127.0.0.1:PORT/ (...)"
        assert " at http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1].split("/ ")[0]
        serving = call("GET", url + "/info")[1]["serving"]
        assert (serving["max_batch"], serving["max_wait_ms"], serving["max_records"]) == (3, 2, 7)
        status, got = predict(url, {"image": b64(images[1]), "text": QUESTION})
        assert status == 200
        assert_same(got, expected[1])
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert "stopped" in out and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ---------------------------------------------------------------------------------------------- the demo page
def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def test_the_demo_page_in_a_real_browser(url: str, images: list[Path], expected) -> None:
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium installed (apt-get install chromium); this test drives a real browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            timeout=60_000,
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(url + "/")
            page.wait_for_selector("#submit:not([disabled])")
            assert "color (multiclass)" in page.text_content("#summary")
            page.click("#submit")  # nothing given: the server's one-line error is shown
            page.wait_for_selector("#error:not([hidden])")
            assert "none of the run's inputs" in page.text_content("#error")
            page.set_input_files("#input-image", str(images[2]))
            page.fill("#input-text", QUESTION)
            page.check("#explain")  # and show the explanation picture under the answers
            page.click("#submit")
            page.wait_for_selector('[data-task="color"] .answer')
            assert page.is_hidden("#error")
            for task, result in expected[2].items():
                card = f'[data-task="{task}"]'
                shown = page.text_content(f"{card} .answer")
                if "label" in result:
                    assert shown == result["label"], task
                elif "value" in result:
                    assert float(shown) == pytest.approx(result["value"], abs=1e-4), task
                else:
                    assert shown == (", ".join(result["labels"]) or "(none)"), task
            top = max(expected[2]["color"]["probabilities"].values())
            assert f"{100 * top:.1f}%" in page.text_content('[data-task="color"]')
            page.wait_for_selector("#explanation-img:not([hidden])")
            page.wait_for_function("document.getElementById('explanation-img').complete")
            assert page.eval_on_selector("#explanation-img", "img => img.naturalWidth") > 300
            assert page.is_hidden("#error")
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------- issue 19
def test_an_aborted_upload_is_the_clients_499_in_one_log_line(run_dir: Path, caplog) -> None:
    """A client that closes the connection halfway through its body: counted as 499 (not 500), one log line,
    no traceback."""
    import logging

    with running(run_dir, max_batch=4, max_wait_ms=20) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
                head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                sock.sendall(head.encode() + b"Content-Length: 100000\r\n\r\n" + b'{"text": "' + b"a" * 1000)
                time.sleep(0.3)
            deadline = time.monotonic() + TIMEOUT
            while not stats(server.url)["errors"] and time.monotonic() < deadline:
                time.sleep(0.05)
            errors = stats(server.url)["errors"]
        assert errors == {"499": 1}, errors
        lines = [r for r in caplog.records if r.name.startswith(("mmfuse", "uvicorn"))]
        assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in lines]
        assert "went away" in lines[0].getMessage()


def test_a_request_whose_output_is_not_finite_fails_alone_with_422() -> None:
    """The batcher predicts a failed batch again request by request; the failing request alone gets its error."""
    from mmfuse.data import DataError

    def model(records: list[Any]) -> list[dict[str, Any]]:
        if "nan" in records:
            raise DataError("the model's output for task 't' is not finite")
        return [{"echo": r} for r in records]

    batcher = Batcher([model], max_batch=8, max_wait_s=0.2)

    async def drive() -> list[Any]:
        return await asyncio.gather(*(batcher.submit([p]) for p in ("a", "nan", "b")), return_exceptions=True)

    try:
        a, bad, b = asyncio.run(drive())
    finally:
        batcher.close()
    assert a == [{"echo": "a"}] and b == [{"echo": "b"}] and isinstance(bad, DataError)


def test_a_record_whose_output_is_not_finite_is_a_422_with_one_line(
    run_dir: Path, images: list[Path], tmp_path
) -> None:
    """Whatever makes an output NaN (here a head weight, in a copy of the run): the server answers 422 with one
    line and counts it as 422 (it answered 200 with null probabilities)."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if k.startswith("heads.size") and k.endswith("weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors")
    with running(broken, max_batch=4, max_wait_ms=20) as server:
        status, reply = predict(server.url, {"image": b64(images[0]), "text": QUESTION})
        assert status == 422, reply
        assert reply["error"] == (
            "the model's output for task 'size' is not finite (NaN or infinite) for 1 of 1 record(s), most often "
            "an input far outside the training data; no answer is given"
        )
        assert stats(server.url)["errors"] == {"422": 1}
