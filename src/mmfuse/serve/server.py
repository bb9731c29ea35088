"""A run served over HTTP by uvicorn: load the run once per worker, bind, serve in the foreground or a thread."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import uvicorn

from mmfuse.builders import run_outline
from mmfuse.config import ConfigError
from mmfuse.predict import Predictor
from mmfuse.serve.app import Service, create_app
from mmfuse.serve.batcher import Batcher
from mmfuse.serve.inputs import Limits, RecordReader, file_fields


@dataclass(frozen=True)
class ServeOptions:
    """How to serve (the `mmfuse serve` flags).

    Attributes:
        host: address to listen on (127.0.0.1: this machine only).
        port: TCP port; 0 picks a free one (see `Server.url`).
        max_batch: most records in one forward pass; 1 turns batching off.
        max_wait_ms: longest a batch waits for more requests, from its oldest request's arrival.
        workers: inference threads, each with its own copy of the model, sharing one queue.
        limits: what one request may hold.
        allow_missing: accept records that lack an input the model was trained with.
        device: "cpu", "cuda", ...; default CUDA when available.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    workers: int = 1
    limits: Limits = field(default_factory=Limits)
    allow_missing: bool = False
    device: str | None = None

    def check(self) -> None:
        for name, value, low in (("--max-batch", self.max_batch, 1), ("--workers", self.workers, 1)):
            if value < low:
                raise ConfigError(f"{name} must be at least {low}, got {value}")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise ConfigError(f"--max-wait-ms must be between 0 and 60000, got {self.max_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        lim = self.limits
        if min(lim.max_body_bytes, lim.max_records, lim.max_pixels) < 1:
            raise ConfigError("--max-body-mb, --max-records and --max-image-pixels must be positive")


def describe_run(predictor: Predictor, run_dir: Path, options: ServeOptions, files: set[str]) -> dict[str, Any]:
    """The static part of GET /info: tasks, inputs, the run's metrics and the serving settings."""
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()).get("metrics") if metrics_file.is_file() else None
    needs_all = not (predictor.trained_for_missing or options.allow_missing)
    model = predictor.model
    return {
        "name": run_outline(predictor.config).name,
        "tasks": {name: {"kind": t.kind, "classes": t.classes} for name, t in model.tasks.items()},
        "inputs": {
            m: {
                "fields": keys,
                "modality": model.encoders[m].modality,
                "upload": any(k in files for k in keys),
                "required": needs_all,
            }
            for m, keys in predictor.input_fields.items()
        },
        "metrics": metrics,
        "serving": {
            "max_batch": options.max_batch,
            "max_wait_ms": options.max_wait_ms,
            "workers": options.workers,
            "device": str(predictor.device),
            "max_body_bytes": options.limits.max_body_bytes,
            "max_records": options.limits.max_records,
            "max_pixels": options.limits.max_pixels,
        },
    }


def _upload_parent() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def _thread_setup(workers: int) -> Callable[[], None] | None:
    """Per worker thread: share the cores among the workers instead of each using all of them."""
    if workers <= 1:
        return None
    per_worker = max(1, torch.get_num_threads() // workers)
    return partial(torch.set_num_threads, per_worker)


class Server:
    """One run served over HTTP with dynamic batching.

    Args:
        run_dir: a finished run directory.
        options: how to serve.

    Example:
        >>> server = Server("runs/easy_vqa", ServeOptions(port=0))
        >>> url = server.start()          # in a background thread; `serve()` blocks instead
        >>> server.stop()
    """

    def __init__(self, run_dir: str | Path, options: ServeOptions) -> None:
        options.check()
        self.options, self.run_dir = options, Path(run_dir)
        self._threads_before = torch.get_num_threads()
        predictors = [Predictor(run_dir, options.device) for _ in range(options.workers)]
        self.upload_dir = Path(tempfile.mkdtemp(prefix="mmfuse-serve-", dir=_upload_parent()))
        reader = RecordReader(predictors[0], options.limits, options.allow_missing)
        fns = [partial(p.predict, batch_size=options.max_batch) for p in predictors]
        batcher = Batcher(
            fns,
            options.max_batch,
            options.max_wait_ms / 1000.0,
            _thread_setup(options.workers),
            prepare=lambda payload: reader.records(*payload),
        )
        info = describe_run(predictors[0], self.run_dir, options, file_fields(predictors[0]))
        self.service = Service(reader, batcher, self.upload_dir, info)
        self.app = create_app(self.service)
        self.app.router.lifespan_context = self._lifespan
        self._socket: socket.socket | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def url(self) -> str:
        if self._socket is None:
            raise RuntimeError("bind() first")
        host, port = self._socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def bind(self) -> str:
        """Listen on the host and port; returns the URL. OSError when the address cannot be had."""
        family, kind, proto, _, address = socket.getaddrinfo(
            self.options.host, self.options.port, type=socket.SOCK_STREAM
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        self._socket = sock
        return self.url

    def serve(self) -> None:
        """Serve until SIGINT/SIGTERM (foreground, main thread); cleans up on the way out."""
        if self._socket is None:
            self.bind()
        self._uvicorn = uvicorn.Server(self._config())
        try:
            self._uvicorn.run(sockets=[self._socket])
        finally:
            self.close()

    def start(self, timeout: float = 60.0) -> str:
        """Serve from a background thread; returns the URL once requests are answered."""
        url = self.bind() if self._socket is None else self.url
        self._uvicorn = uvicorn.Server(self._config())
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [self._socket]}, name="mmfuse-serve", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return url

    def stop(self, timeout: float = 30.0) -> None:
        """Stop a server started with `start` and clean up."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.close()

    def close(self) -> None:
        """End the workers, remove the upload folder, close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.service.batcher.close()
        shutil.rmtree(self.upload_dir, ignore_errors=True)
        if self._socket is not None:
            self._socket.close()
        if self.options.workers > 1:
            torch.set_num_threads(self._threads_before)

    @asynccontextmanager
    async def _lifespan(self, app: Any) -> Any:
        yield
        self.close()  # before uvicorn re-raises a caught SIGTERM, which ends the process

    def _config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=10
        )
