"""Batched searching: the queries of concurrent requests answered together, on the event loop
while batches are quick, in a thread of their own when the index is slow."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ..ann import set_threads
from ..search import Query, QueryResult, SearchIndex
from .overload import OverloadLog, busy

# Queries waiting for the next batch: a few batches' worth (a batch of 64 light queries takes
# about 30 ms on two cores), so a request admitted is answered well within a second.
MAX_WAITING = 256
# A batch expected to take longer than this (from the time a query took in recent batches) runs
# in a thread, so that a slow index (a million vectors searched exactly: ~30 ms a query) does not
# hold the event loop: health checks, other routes and reading requests go on meanwhile. The
# default bundle's queries take ~0.4 ms each, decoding included: its batches of up to ~100 stay
# on the loop, where they cost less CPU.
LOOP_BUDGET_SECONDS = 0.050
# The weight of the latest batch in the running estimate of the time a query takes.
_NEWEST = 0.25


class SearchBatcher:
    """Answers the queries of concurrent requests together with one :meth:`SearchIndex.query`
    call: one encoder call, one FAISS call.

    An exact scan of 60,000 vectors costs several times less per query for a batch than for one
    query at a time. Queries that arrive while a batch runs wait for it and form the next batch.
    There is no timer: a lone request is answered at once.

    Batches run on the event loop itself, not in a worker thread. Measured with 8 keep-alive
    clients (``scripts/bench_service.py``), a search thread cost 0.45 ms more CPU a request in
    hand-offs and in the two threads taking turns at the interpreter lock than it saved, and
    one process answered 660-680 requests/s with it against 930-970 without. A batch holds the
    loop for a few milliseconds (light images only, see below); the requests that arrive
    meanwhile are read as soon as it ends and form the next batch. Processes (``serve
    --workers N``), not threads, use more cores. A batch that would hold the loop longer than
    :data:`LOOP_BUDGET_SECONDS` (a slow index: the time per query is measured on every batch)
    runs in one thread of the batcher's own instead; FAISS and the encoder release the
    interpreter lock while they compute, so the loop keeps answering meanwhile.

    Costly image files arrive decoded (:mod:`.pools`); light ones (10 ms at worst) are decoded
    in the batch: no query waits for another's costly image. At most :data:`MAX_WAITING` queries
    wait for the next batch; beyond that a request is refused at once with 503 and
    ``Retry-After`` (logged once per interval), rather than queued behind seconds of work.
    """

    def __init__(self, index: SearchIndex, threads: int, max_waiting: int = MAX_WAITING) -> None:
        self.index = index
        self.threads = threads
        self.max_waiting = max_waiting
        self._overload = OverloadLog()
        self._waiting: list[tuple[Query, int, asyncio.Future[QueryResult]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._per_query: float | None = None  # seconds; None until a batch has been timed
        self._thread: ThreadPoolExecutor | None = None

    async def search(self, query: Query, k: int) -> QueryResult:
        """The answer to one query with up to ``k`` neighbours; its own LenetEmbedError is
        raised here."""
        if len(self._waiting) >= self.max_waiting:
            self._overload.refused(
                "search queue", f"search queue full: {self.max_waiting} queries waiting for the "
                "next batch; answering 503 with Retry-After")
            raise busy("the service is busy searching for others; retry in a moment")
        future: asyncio.Future[QueryResult] = asyncio.get_running_loop().create_future()
        self._waiting.append((query, k, future))
        if self._drainer is None:
            # A task of its own, so a client that hangs up cancels only its own wait.
            self._drainer = asyncio.create_task(self._drain())
        result = await future
        if result.error is not None:
            raise result.error
        return result

    def stop(self) -> None:
        """End the batcher's thread, if a slow index started one, once its batch (if any) is
        done: at the app's shutdown. A later batch starts a new one."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.shutdown(wait=True, cancel_futures=True)

    async def _drain(self) -> None:
        try:
            # One turn of the loop first: requests read with this one join its batch.
            await asyncio.sleep(0)
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    outcomes: list[QueryResult] | list[Exception] = await self._run(
                        [(query, k) for query, k, _ in batch])
                except Exception as exc:  # not any one query's fault: every request gets it
                    outcomes = [exc] * len(batch)
                for (_, _, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
                # The requests that arrived during the batch are read before the next one.
                await asyncio.sleep(0)
        finally:
            self._drainer = None

    async def _run(self, batch: list[tuple[Query, int]]) -> list[QueryResult]:
        """:meth:`_answer` on the loop when the batch is expected to be quick, else in the
        batcher's thread; the time it took updates the estimate either way."""
        expected = 0.0 if self._per_query is None else self._per_query * len(batch)
        started = time.perf_counter()
        try:
            if expected <= LOOP_BUDGET_SECONDS:
                return self._answer(batch)
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="search-batch")
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._answer,
                                                                    batch)
        finally:
            took = (time.perf_counter() - started) / len(batch)
            self._per_query = took if self._per_query is None else (
                _NEWEST * took + (1 - _NEWEST) * self._per_query)

    def _answer(self, batch: list[tuple[Query, int]]) -> list[QueryResult]:
        """Every query of the batch in one call, at the largest k asked (bounded by the items
        there are now: a removal may have landed since the request was checked), then each cut
        to its own k."""
        # FAISS's thread cap is per calling thread, so it is set in the thread that searches.
        set_threads(self.threads)
        k = min(max(k for _, k in batch), max(len(self.index), 1))
        results = self.index.query([query for query, _ in batch], k)
        return [result.top(wanted) for result, (_, wanted) in zip(results, batch, strict=True)]
