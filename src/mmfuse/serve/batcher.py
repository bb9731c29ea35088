"""Dynamic batching: requests from many clients share one forward pass.

Requests (each a list of records) wait in one queue. A worker thread takes the oldest request and keeps
taking more until the batch holds `max_batch` records, or until `max_wait_s` has passed since the oldest
request ARRIVED (so a request that already waited while the workers were busy is not held again). A request
is never split across batches; a request larger than `max_batch` forms a batch of its own (predicted in
chunks of `max_batch`). `workers` threads each run their own copy of the model, taking batches from the
same queue, so one batch's forward overlaps with the next batch's gathering.

A request may be queued raw, with the number of records it holds, and turned into records by the worker that
takes it (`prepare`): decoding then stays off the event loop without a trip through a thread pool (each hop
between threads costs a scheduler wake-up, several milliseconds on a loaded machine). A request whose
`prepare` fails gets that error alone; the rest of its batch goes on. A batch whose prediction fails is predicted
again request by request, so a request that makes the model fail (a record whose output would be NaN) fails
alone too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmfuse.data.records import DataError

log = logging.getLogger(__name__)

PredictFn = Callable[[list[Any]], list[dict[str, Any]]]


@dataclass
class _Job:
    payload: Any  # the records, or what `prepare` turns into them
    size: int  # records it holds
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)


class BatchStats:
    """Counters of what the workers did (thread-safe): batches, their sizes, records, time in the model."""

    def __init__(self, workers: int) -> None:
        self._lock = threading.Lock()
        self.batches = 0
        self.records = 0
        self.sizes: Counter[int] = Counter()
        self.per_worker = [0] * workers
        self.model_s = 0.0

    def add(self, worker: int, size: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.records += size
            self.sizes[size] += 1
            self.per_worker[worker] += 1
            self.model_s += seconds

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "batches": self.batches,
                "records": self.records,
                "largest_batch": max(self.sizes, default=0),
                "mean_batch": round(self.records / self.batches, 3) if self.batches else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                "batches_per_worker": list(self.per_worker),
                "model_seconds": round(self.model_s, 3),
            }


class Batcher:
    """Gathers requests into batches of at most `max_batch` records for `len(predict_fns)` worker threads.

    Args:
        predict_fns: one function per worker: records -> one result per record (each its own model copy).
        max_batch: most records in one forward pass (1: batching off).
        max_wait_s: longest time a batch waits for more requests, counted from its oldest request's arrival.
        on_worker_start: called in each worker thread before its first batch (e.g. `torch.set_num_threads`).
        prepare: payload -> records, run by the worker for each request it takes (default: the payload is the
            list of records); an exception fails that request only.
    """

    def __init__(
        self,
        predict_fns: Sequence[PredictFn],
        max_batch: int,
        max_wait_s: float,
        on_worker_start: Callable[[], None] | None = None,
        prepare: Callable[[Any], list[Any]] | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_s < 0 or not predict_fns:
            raise ValueError("max_batch must be >= 1, max_wait_s >= 0, and there must be a worker")
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.stats = BatchStats(len(predict_fns))
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # records in self._jobs
        self._cond = threading.Condition()
        self._closed = False
        self._on_start = on_worker_start
        self._prepare = prepare or list
        self._threads = [
            threading.Thread(target=self._work, args=(i, fn), name=f"mmfuse-serve-worker-{i}", daemon=True)
            for i, fn in enumerate(predict_fns)
        ]
        for t in self._threads:
            t.start()

    @property
    def queued_records(self) -> int:
        return self._queued

    def enqueue(self, payload: Any, size: int | None = None) -> asyncio.Future:
        """Queue one request (call from the event loop): its records, or a payload for `prepare` holding `size`
        records. The returned future gets one result per record, or the request's error."""
        loop = asyncio.get_running_loop()
        job = _Job(payload, len(payload) if size is None else size, loop.create_future(), loop)
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._jobs.append(job)
            self._queued += job.size
            self._cond.notify_all()
        return job.future

    async def submit(self, payload: Any, size: int | None = None) -> list[dict[str, Any]]:
        """Queue one request and wait for its results."""
        return await self.enqueue(payload, size)

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests; the workers finish what is queued, then end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _take(self) -> list[_Job] | None:
        """The next batch (oldest requests first), or None once closed and drained."""
        with self._cond:
            while True:
                if not self._jobs:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                if self._queued >= self.max_batch or self._closed:
                    break
                remaining = self._jobs[0].arrived + self.max_wait_s - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, n = [], 0
            while self._jobs and (not batch or n + self._jobs[0].size <= self.max_batch):
                job = self._jobs.popleft()
                batch.append(job)
                n += job.size
            self._queued -= n
            if self._jobs:
                self._cond.notify_all()  # what is left may already fill another worker's batch
            return batch

    def _work(self, worker: int, predict: PredictFn) -> None:
        if self._on_start is not None:
            self._on_start()
        while (batch := self._take()) is not None:
            jobs, parts = [], []
            for job in batch:
                try:
                    parts.append(self._prepare(job.payload))
                    jobs.append(job)
                except Exception as err:  # this request is bad (or gone): it alone gets the error
                    _answer(job, err)
            self._predict(worker, predict, jobs, parts)

    def _predict(self, worker: int, predict: PredictFn, jobs: list[_Job], parts: list[list[Any]]) -> None:
        """Predict the records of `jobs` in one call and answer each job; if that fails, each job alone."""
        records = [r for part in parts for r in part]
        if not records:
            for job in jobs:
                _answer(job, [])
            return
        start = time.monotonic()
        try:
            results: list[dict[str, Any]] | BaseException = predict(records)
        except Exception as err:  # the worker lives on
            if len(jobs) > 1:  # one request may be the cause: each alone, so the others still get their answers
                for job, part in zip(jobs, parts):
                    self._predict(worker, predict, [job], [part])
                return
            if isinstance(err, DataError):  # the request's records: its client gets the one line (422)
                log.info("refused a request of %d records: %s", len(records), err)
            else:
                log.exception("prediction failed for a batch of %d records", len(records))
            results = err
        self.stats.add(worker, len(records), time.monotonic() - start)
        at = 0
        for job, part in zip(jobs, parts):
            _answer(job, results if isinstance(results, BaseException) else results[at : at + len(part)])
            at += len(part)


def _answer(job: _Job, outcome: list[dict[str, Any]] | BaseException) -> None:
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, outcome)
    except RuntimeError:  # its event loop is closed: nobody is waiting any more
        pass


def _settle(future: asyncio.Future, outcome: list[dict[str, Any]] | BaseException) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
