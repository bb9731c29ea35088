"""The HTTP API over one loaded run: routes, body limits, error replies, counters.

Routes:
    GET  /          the demo page (serve_static/index.html; app.js and style.css under /static/)
    GET  /health    {"status": "ok"}
    GET  /info      the run's tasks (kind, classes), inputs (fields, which are uploads), metrics.json's
                    metrics, the serving settings and the counters of /stats
    GET  /stats     requests, records, errors by status, batches and their sizes, per worker
    POST /predict   one record (a JSON object, or a multipart form) or a list of records (a JSON list);
                    answers what `mmfuse predict` gives per record: {task: {label, probabilities} | ...}
    POST /explain   one record, as for /predict: `mmfuse explain`'s numbers plus its picture as a PNG data URL
                    under "image" (`?format=png`: the PNG itself); one at a time, outside the batcher
    POST /noop      reads and parses the body like /predict, predicts nothing: the HTTP overhead probe

Every error is a JSON object {"error": "<one line>"} with a 4xx status (5xx only for a fault of the server).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mmfuse.data.records import DataError
from mmfuse.serve.batcher import Batcher
from mmfuse.serve.inputs import RecordReader, RequestError, Uploads, parse_json

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent.parent / "serve_static"


class Service:
    """What the routes use: the record reader, the batcher, the upload folder and the run's description.

    Args:
        reader: turns request rows into checked records.
        batcher: the dynamic batcher (owns the worker threads).
        upload_dir: private folder for the uploaded files of requests in flight.
        info: the static part of /info.
    """

    def __init__(self, reader: RecordReader, batcher: Batcher, upload_dir: Path, info: dict[str, Any]) -> None:
        self.reader, self.batcher, self.upload_dir, self.info = reader, batcher, upload_dir, info
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests = 0
        self.answered = 0
        self.errors: Counter[int] = Counter()
        self._explainer: Any = None
        self._explain_lock = threading.Lock()

    def explain(self, rows: list[Any], uploads: Uploads) -> tuple[dict[str, Any], bytes]:
        """(the explanation's numbers, its PNG) for one request row; one explanation at a time.

        The explainer shares the first worker's model (read only: it runs the fusion and heads on detached
        features), so it costs no second copy of the weights.
        """
        from mmfuse.workbench.explain import Explainer, NeedsCaptum
        from mmfuse.workbench.explain_figure import render

        if len(rows) != 1:
            raise RequestError(422, f"/explain takes one record, got {len(rows)}")
        with self._explain_lock:
            records = self.reader.records(rows, uploads)
            if self._explainer is None:
                self._explainer = Explainer(self.reader.predictor)
            try:
                explanation = self._explainer.explain(records[0])
            except NeedsCaptum as err:
                raise RequestError(501, f"{err} on the server") from None
            except DataError as err:  # e.g. the record's output is not finite
                raise RequestError(422, str(err)) from None
            report = {k: v for k, v in explanation.report.items() if k != "inputs"}  # no server upload paths
            return report, render(explanation)

    def count(self, status: int | None) -> None:
        with self._lock:
            self.requests += 1
            if status is None:
                self.answered += 1
            else:
                self.errors[status] += 1

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count the request handled inside: answered, or failed with its 4xx (`RequestError`) or a 500."""
        try:
            yield
        except RequestError as err:
            self.count(err.status)
            raise
        except Exception:
            self.count(500)
            raise
        self.count(None)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            head = {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": self.requests,
                "answered": self.answered,
                "errors": {str(k): v for k, v in sorted(self.errors.items())},
            }
        return {**head, "queued_records": self.batcher.queued_records, **self.batcher.stats.snapshot()}


async def _drain(request: Request, budget: int) -> None:
    """Read and drop up to `budget` more body bytes, so that a client still sending sees the reply.

    A server that answers 413 and closes while the client is mid-upload makes the client's TCP
    stack reset the connection, and most clients then report "connection reset" instead of the
    413. Reading a bounded remainder avoids that; a larger body is cut off after `budget`.
    """
    try:
        async for chunk in request.stream():
            budget -= len(chunk)
            if budget < 0:
                return
    except Exception:  # the client went away: nothing more to read
        return


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over `limit` bytes; 499 (one log line,
    no traceback) when the client goes away before sending all of it."""
    try:
        return await _read_body(request, limit)
    except ClientDisconnect:
        log.info("%s %s: the client went away before sending its whole body", request.method, request.url.path)
        raise RequestError(499, "the client went away before sending the whole body") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "the Content-Length header is not a number")
        if int(declared) > limit:
            await _drain(request, 4 * limit)
            raise RequestError(413, f"the body ({int(declared):,} bytes) is over the limit of {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await _drain(request, 4 * limit)
            raise RequestError(413, f"the body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_rows(request: Request, limit: int) -> tuple[list[Any], bool]:
    """(rows, single) from a JSON body or a multipart form (one record; file parts are bytes)."""
    body = await read_body(request, limit)
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind in ("application/json", ""):
        return parse_json(body)
    if kind != "multipart/form-data":
        raise RequestError(415, f"send application/json or multipart/form-data, not {kind}")

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=64, max_fields=256)
    except Exception as err:  # python-multipart's errors: a malformed form is the client's fault
        raise RequestError(400, f"the multipart form cannot be parsed ({str(err)[:120]})") from None
    row: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in row:
            raise RequestError(422, f"field {key!r} is given twice")
        row[key] = await value.read() if isinstance(value, UploadFile) else value
    await form.close()
    return [row], True


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as null (strict JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_response(value: Any) -> Response:
    """Strict JSON (NaN and infinities as null), compact."""
    try:
        body = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        body = json.dumps(_finite(value), separators=(",", ":"), allow_nan=False)
    return Response(body.encode(), media_type="application/json")


def create_app(service: Service) -> FastAPI:
    """The FastAPI application over `service` (OpenAPI pages off: they would load scripts from the web)."""
    app = FastAPI(title="mmfuse", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    limit = service.reader.limits.max_body_bytes

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "malformed request"}, status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("error answering %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> Response:
        return json_response({**service.info, "stats": service.stats()})

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return service.stats()

    @app.post("/noop")
    async def noop(request: Request) -> Response:
        await read_rows(request, limit)
        return Response(b"{}", media_type="application/json")

    @app.post("/explain")
    async def explain(request: Request) -> Response:
        uploads = Uploads(service.upload_dir)
        try:
            with service.counted():
                rows, _ = await read_rows(request, limit)
                report, png = await asyncio.to_thread(service.explain, rows, uploads)
        finally:
            uploads.close()
        if request.query_params.get("format") == "png":
            return Response(png, media_type="image/png")
        return json_response({**report, "image": "data:image/png;base64," + base64.b64encode(png).decode()})

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        uploads, pending = Uploads(service.upload_dir), None
        try:
            with service.counted():
                rows, single = await read_rows(request, limit)
                service.reader.check_count(rows)
                # Decoded and checked by the worker that takes it (`RecordReader.records`), then predicted.
                pending = service.batcher.enqueue((rows, uploads), len(rows))
                try:
                    results = await asyncio.shield(pending)
                except DataError as err:  # e.g. a record whose output would not be finite
                    raise RequestError(422, uploads.scrub(str(err))) from None
        finally:
            if pending is not None and not pending.done():  # abandoned by its client: clean up once predicted
                pending.add_done_callback(lambda _: uploads.close())
            else:
                uploads.close()
        return json_response(results[0] if single else results)

    return app
