"""One background thread that owns the engine, so no caller can hold it by walking away from a stream.

    caller                          worker thread
    submit(request) -> Job   -->    bounded queue (full: ServerBusy)   -->   engine.stream([requests...])
    iterate the Job (sync or async) <--  each StreamDelta, an exception, or the end

A consumer that stops reading only leaves deltas in its job's buffer (at most one per generated token); `job.cancel()`
ends the job at the next decode step when it is running, or drops it unrun when it is waiting. An exception inside
the engine goes to the jobs of that batch (raised where they iterate); the worker goes on with the next job.
`stop(timeout)` cancels everything and joins the thread (a daemon, so it never keeps a process alive).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from typing import AsyncIterator, Iterator

from .engine import Engine, GenerationRequest, GenerationResult, StreamDelta

logger = logging.getLogger(__name__)


class ServerBusy(RuntimeError):
    """The worker's queue is full: retry later."""


class WorkerStopped(RuntimeError):
    """The worker is stopping or stopped: it takes no more jobs."""


class _Failure:
    """An exception on its way to a job's consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class Job:
    """One submitted request: iterate it for its StreamDeltas (`for` from a thread, `async for` on the event loop
    given at submit), or take `result()` / `await aresult()`. Iteration ends after the last delta; an engine error
    is raised there."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None):
        request.cancel = request.cancel or threading.Event()
        self.request, self._loop = request, loop
        self._items: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def cancel(self) -> None:
        """End the job: at the next decode step when running; unrun when still waiting. Idempotent."""
        self.request.cancel.set()

    @property
    def cancelled(self) -> bool:
        return self.request.cancel.is_set()

    def deliver(self, item) -> None:
        """(worker thread) Hand a delta, a _Failure or the end to the consumer; a consumer whose event loop has
        closed is gone, so the job is cancelled."""
        if self._loop is None:
            self._items.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the loop is closed
            self.cancel()

    def _unpack(self, item):
        if isinstance(item, _Failure):
            raise item.error
        return item

    def __iter__(self) -> Iterator[StreamDelta]:
        while (item := self._unpack(self._items.get())) is not _END:
            yield item

    async def __aiter__(self) -> AsyncIterator[StreamDelta]:
        while (item := self._unpack(await self._items.get())) is not _END:
            yield item

    def result(self) -> GenerationResult | None:
        """The whole result (None when the job was dropped before it ran)."""
        results = [delta.result for delta in self if delta.result is not None]
        return results[-1] if results else None

    async def aresult(self) -> GenerationResult | None:
        results = [delta.result async for delta in self if delta.result is not None]
        return results[-1] if results else None


class EngineWorker:
    """Runs submitted requests on `engine`, `max_batch` waiting requests at a time as one batch (1: each alone,
    exactly as `engine.generate` would answer it), with at most `max_queue` requests waiting."""

    def __init__(self, engine: Engine, max_queue: int = 64, max_batch: int = 1, name: str = "engine-worker"):
        if max_queue < 0 or max_batch < 1:
            raise ValueError(f"max_queue must be >= 0 and max_batch >= 1 (got {max_queue}, {max_batch})")
        self.engine, self.max_queue, self.max_batch = engine, max_queue, max_batch
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._stopping = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Taking jobs: the thread runs and no stop was asked."""
        return self._thread.is_alive() and not self._stopping

    @property
    def waiting(self) -> int:
        """Jobs waiting to run (not counting cancelled ones, which are dropped unrun)."""
        with self._ready:
            return sum(not job.cancelled for job in self._waiting)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue a request; its Job streams back to a thread (loop None) or to `loop`. ServerBusy when the queue
        is full, WorkerStopped after stop()."""
        job = Job(request, loop)
        with self._ready:
            if self._stopping:
                raise WorkerStopped("the server is shutting down")
            live = collections.deque(job for job in self._waiting if not job.cancelled)
            if len(live) >= self.max_queue:
                raise ServerBusy(f"{len(live)} requests are already waiting; retry shortly")
            self._waiting = live
            self._waiting.append(job)
            self._ready.notify()
        return job

    def stop(self, timeout: float | None = None) -> bool:
        """Cancel every job (waiting and running), let the thread finish; True when it has."""
        with self._ready:
            self._stopping = True
            for job in [*self._waiting, *self._running]:
                job.cancel()
            self._ready.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._waiting and not self._stopping:
                    self._ready.wait()
                if not self._waiting:
                    return
                batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
                self._running = batch
            try:
                self._serve(batch)
            finally:
                with self._ready:
                    self._running = []

    def _serve(self, batch: list[Job]) -> None:
        """Run one batch; every job gets its deltas, then an error if the engine raised, then the end."""
        live = [job for job in batch if not job.cancelled]  # a job cancelled while it waited is dropped unrun
        try:
            if live:
                for delta in self.engine.stream([job.request for job in live]):
                    live[delta.index].deliver(StreamDelta(0, delta.text, delta.result))
        except Exception as err:
            logger.exception("generation failed")
            for job in live:
                job.deliver(_Failure(err))
        finally:
            for job in batch:
                job.deliver(_END)
