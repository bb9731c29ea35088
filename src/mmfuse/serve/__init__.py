"""`mmfuse serve`: a finished run's predictions over HTTP, with dynamic batching and a demo page.

Stack: FastAPI on uvicorn (the `serve` extra: `pip install "mmfuse[serve]"`), with a small batching queue
of our own (`batcher.py`) and the model run in-process by `mmfuse.predict.Predictor`. LitServe (0.2.19) was
installed and read first, as it batches dynamically and belongs to the Lightning family, but:

- in its batched loop one request that fails to decode fails EVERY request of its batch (one 4xx answers
  them all), while a bad request here must never spoil other clients' requests;
- it reserves /health and /info for its own replies, which this server defines (tasks, classes, metrics);
- it runs the model in separate worker processes and passes every request through a multiprocessing
  manager queue (pickled, via the manager's own process): on a 2-core CPU that is two process hops per request
  that the in-process queue here does not pay.

FastAPI + uvicorn are the common, well-kept pair underneath LitServe itself, so nothing is lost by using
them directly, and the whole batching policy fits in one 200-line file with its guarantees tested.

Modules: `inputs` (request bodies -> checked records; uploads, never server paths), `batcher` (the dynamic
batching queue and its worker threads), `app` (routes, limits, errors, counters), `server` (load, bind,
serve in the foreground or in a thread).
"""

from mmfuse.serve.inputs import Limits, RequestError
from mmfuse.serve.server import ServeOptions, Server

__all__ = ["Limits", "RequestError", "ServeOptions", "Server"]
