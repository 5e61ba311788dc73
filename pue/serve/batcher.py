"""Requests' rows coalesced into runtime batches, run one batch at a time off the event loop.

Rows arrive already validated (`pue.serve.rows`), so a batch fails only through a bug, never through another
client's row. A batch is taken when it holds `max_batch` rows or its oldest request has waited `max_wait_s`
(whole requests: a request is never split across batches; one larger than `max_batch` runs alone and the
Embedder cuts it into batches of `max_batch`). With `per_request`, every request is its own batch: for
precisions whose results depend on batch companions (int8-dynamic's per-batch activation scales), a client's
vectors then depend only on its own request, as `Embedder.embed(its rows)` gives them.

The queue holds at most `max_queue` rows; a request that does not fit is refused (`QueueFull`: 503 with
Retry-After), except into an empty queue, so that a request within the input limit always has a chance.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pue.runtime import Query
from pue.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue has no room for the request's rows."""


class Draining(Exception):
    """The server is shutting down and takes no new rows."""


@dataclass
class _Job:
    queries: list[Query]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Coalesces `submit`ted rows into batches for `embed(queries)`, which runs in one worker thread."""

    def __init__(
        self,
        embed: Callable[[list[Query]], np.ndarray],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        per_request: bool,
        metrics: ServeMetrics | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"bad batcher limits: max_batch={max_batch} max_queue={max_queue} max_wait={max_wait_s}")
        self.embed = embed
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.per_request = per_request
        self.metrics = metrics
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._draining = False

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def has_room(self, rows: int) -> bool:
        return not self._draining and (self._queued_rows == 0 or self._queued_rows + rows <= self.max_queue)

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pue-serve-inference")
        self._task = asyncio.create_task(self._loop(), name="pue-serve-batcher")

    async def run_now(self, queries: list[Query]) -> np.ndarray:
        """Run `queries` in the inference thread outside the queue (the warm-up batch)."""
        assert self._executor is not None, "start() the batcher first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.embed, queries)

    async def submit(self, queries: list[Query]) -> np.ndarray:
        """The rows' vectors, in order, once their batch ran; `QueueFull` or `Draining` when refused."""
        if self._draining:
            raise Draining()
        if not self.has_room(len(queries)):
            raise QueueFull()
        job = _Job(queries, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._set_queued(self._queued_rows + len(queries))
        self._notify()
        return await job.future

    async def drain(self) -> None:
        """Refuse new rows, finish every queued one, then stop the worker thread."""
        self._draining = True
        self._notify()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # --- internals --------------------------------------------------------------------------------------
    def _notify(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _set_queued(self, rows: int) -> None:
        self._queued_rows = rows
        if self.metrics is not None:
            self.metrics.queue_rows.set(rows)

    async def _wait(self, timeout: float | None) -> None:
        assert self._wakeup is not None
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                if self._draining:
                    return
                await self._wait(None)
            if not self.per_request:
                deadline = self._jobs[0].enqueued + self.max_wait_s
                while self._queued_rows < self.max_batch and not self._draining:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    await self._wait(remaining)
            batch = self._take()
            if batch:
                await self._run(loop, batch)

    def _take(self) -> list[_Job]:
        batch: list[_Job] = []
        rows = 0
        while self._jobs:
            job = self._jobs[0]
            if batch and (self.per_request or rows + len(job.queries) > self.max_batch):
                break
            self._jobs.popleft()
            self._set_queued(self._queued_rows - len(job.queries))
            if job.future.done():  # the client went away while it waited
                continue
            batch.append(job)
            rows += len(job.queries)
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        started = time.perf_counter()
        queries = [query for job in batch for query in job.queries]
        if self.metrics is not None:
            for job in batch:
                self.metrics.stage_seconds.labels("queue").observe(started - job.enqueued)
            self.metrics.batch_size.observe(len(queries))
        try:
            vectors = await loop.run_in_executor(self._executor, self.embed, queries)
        except Exception as exc:  # a bug (rows were validated): every request of the batch gets a 500
            log.exception("a runtime batch of %d rows failed", len(queries))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        if self.metrics is not None:
            self.metrics.stage_seconds.labels("inference").observe(time.perf_counter() - started)
        offset = 0
        for job in batch:
            count = len(job.queries)
            if not job.future.done():
                job.future.set_result(vectors[offset : offset + count])
            offset += count
