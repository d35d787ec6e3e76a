"""The engine worker in a process of its own: a server's event loop and the decode steps then run side by side on two
cores, instead of taking turns under one interpreter lock.

    server process                                  engine process (spawned)
    EngineProcess.submit(request) -> Job  --pipe-->  EngineWorker (worker.py) on the engine `factory()` builds
    Job.cancel()                          --pipe-->  that job cancelled at its next step
    a reader thread hands deltas to jobs  <--pipe--  the worker's deliveries, a batch a message, with the queue
                                                     length, the running batch and the KV memory (those alone
                                                     too, within SIZES_INTERVAL_S of a change)

The server keeps an engine of its own for what it does before queueing (the chat template, tokens, image pixel
values); requests cross as pickles, their images as pixel values. The limits are kept on the server's side: a
prompt longer than a slot and a full queue are refused at `submit` (the queue: the jobs not ended, less the max_batch
that run). If the engine process dies, every open job ends with an error and `alive` turns false (the server's
/ready answers 503).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
from typing import Callable

import torch

from .engine import Engine, GenerationRequest, RequestError, StreamDelta
from .scheduler import fits_a_slot
from .worker import END, EngineWorker, Failure, Job, ServerBusy, WorkerStopped, check_limits, deliver

logger = logging.getLogger(__name__)
KNOWN_ERRORS = {cls.__name__: cls for cls in (RequestError, ServerBusy, WorkerStopped)}
SIZES_INTERVAL_S = 0.05  # the queue length and running batch reach the server at least this often when they change


class RemoteJob(Job):
    """A job whose request runs in the engine process: cancelling it tells that process."""

    def __init__(self, request: GenerationRequest, loop, owner: EngineProcess, number: int):
        super().__init__(request, loop)
        self.owner, self.number = owner, number

    def cancel(self) -> None:
        if not self.cancelled:
            super().cancel()
            self.owner.send(("cancel", self.number))


class EngineProcess:
    """EngineWorker's interface (submit, stop, alive, ready, waiting, running, slots, kv_bytes) over an engine built
    by `factory()` (picklable: it runs in the spawned process) with `threads` torch threads there; `engine`: the
    server's own copy of the model, for encoding prompts and images."""

    def __init__(self, engine: Engine, factory: Callable[[], Engine], max_queue: int = 64, max_batch: int = 64,
                 max_len: int | None = 2048, timeout: float | None = None, warm_up: bool = False,
                 threads: int | None = None):
        check_limits(max_queue, max_batch, timeout)
        self.engine, self.max_queue, self.max_batch = engine, max_queue, max_batch
        self.max_len = min(max_len or engine.context, engine.context)
        self.slots, self._kv, self._sizes = max_batch, 0, (0, 0)  # (waiting, running) as last reported
        self._jobs: dict[int, RemoteJob] = {}
        self._numbers, self._lock, self._send_lock = itertools.count(), threading.Lock(), threading.Lock()
        self._ready, self._stopping, self._ended = False, False, False
        context = multiprocessing.get_context("spawn")  # never fork a process that holds torch's threads
        self._conn, child = context.Pipe()
        # the limit is kept here (at most max_batch run, max_queue wait); the worker there may hold them all waiting
        # for a moment (a burst arrives before it admits any), so its own queue takes both
        options = dict(max_queue=max_queue + max_batch, max_batch=max_batch, max_len=max_len, timeout=timeout,
                       warm_up=warm_up)
        self._process = context.Process(target=engine_process_main, args=(child, factory, options, threads),
                                        name="minimind-v-engine", daemon=True)
        self._process.start()
        child.close()
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self._ended and not self._stopping and self._process.is_alive()

    @property
    def ready(self) -> bool:
        return self.alive and self._ready

    @property
    def waiting(self) -> int:
        return self._sizes[0]

    @property
    def running(self) -> int:
        return self._sizes[1]

    def kv_bytes(self) -> int:
        return self._kv

    def submit(self, request: GenerationRequest, loop=None) -> RemoteJob:
        """As EngineWorker.submit: RequestError, ServerBusy, WorkerStopped."""
        fits_a_slot(self.engine.encode(request), self.max_len)
        with self._lock:
            if not self.alive:
                raise WorkerStopped("the engine process is not running" if not self._stopping
                                    else "the server is shutting down")
            ServerBusy.check(len(self._jobs) - self.max_batch, self.max_queue)
            job = RemoteJob(request, loop, self, next(self._numbers))
            self._jobs[job.number] = job
        self.send(("submit", job.number, dataclasses.replace(request, cancel=None)))
        return job

    def send(self, message: tuple) -> None:
        """A message to the engine process (dropped once it has ended: its jobs have ended too)."""
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                pass

    def stop(self, timeout: float | None = None) -> bool:
        """Cancel every job and let the engine process exit (killed after `timeout`); True when it has."""
        self._stopping = True
        self.send(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._reader.join(5)
        return not self._process.is_alive()

    def _read(self) -> None:
        """(reader thread) Hand what the engine process sends to the jobs; when it ends, end the jobs left."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "ready":
                self._ready = True
            elif message[0] == "failed":
                logger.error("the engine process could not start: %s", message[1])
                break
            elif message[0] == "sizes":  # ("sizes", waiting, running, kv bytes)
                self._sizes, self._kv = message[1:3], message[3]
            else:  # ("deliver", [(number, item)], waiting, running, kv bytes)
                self._sizes, self._kv = message[2:4], message[4]
                deliver(self._received(message[1]))
        self._ended = True
        with self._lock:
            left, self._jobs = list(self._jobs.values()), {}
        error = WorkerStopped("the engine process ended")
        deliver([pair for job in left for pair in ((job, Failure(error)), (job, END))])

    def _received(self, items: list[tuple[int, object]]) -> list[tuple[Job, object]]:
        out = []
        with self._lock:
            for number, item in items:
                job = self._jobs.get(number) if item is not None else self._jobs.pop(number, None)
                if job is not None:
                    out.append((job, END if item is None else item if isinstance(item, StreamDelta)
                                else Failure(KNOWN_ERRORS.get(item[0], RuntimeError)(item[1]))))
        return out


def engine_process_main(conn, factory: Callable[[], Engine], options: dict, threads: int | None) -> None:
    """(the engine process) Build the engine and its worker, then relay until told to stop or the server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the server stops this one
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        worker = EngineWorker(factory(), **options)
    except Exception as err:
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    Relay(conn, worker).run()


class Relay:
    """(the engine process) Requests from the pipe into the worker; its deliveries back, batched by a sender
    thread."""

    def __init__(self, conn, worker: EngineWorker):
        self.conn, self.worker = conn, worker
        self.jobs: dict[int, Job] = {}  # what a cancel message names; a job leaves when its end is sent
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()

    def run(self) -> None:
        sender = threading.Thread(target=self._send, name="engine-sender", daemon=True)
        sender.start()
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the server process is gone
                break
            if message[0] == "stop":
                break
            if message[0] == "cancel" and (job := self.jobs.get(message[1])) is not None:
                job.cancel()
            elif message[0] == "submit":
                self._submit(message[1], message[2])
        self.worker.stop(timeout=30)
        self.outbox.put(None)
        sender.join(30)

    def _submit(self, number: int, request: GenerationRequest) -> None:
        with self.lock:  # in self.jobs before its end can be sent
            try:
                self.jobs[number] = self.worker.submit(request, sink=lambda _, item: self.outbox.put((number, item)))
            except (RequestError, ServerBusy, WorkerStopped) as err:
                self.outbox.put((number, Failure(err)))
                self.outbox.put((number, END))

    def _send(self) -> None:
        """Every item waiting, in one message, with the worker's sizes (alone when they changed and nothing else
        was sent for SIZES_INTERVAL_S); "ready" once the worker is warm."""
        announced, sent = False, None
        while True:
            try:
                items = [self.outbox.get(timeout=SIZES_INTERVAL_S)]
            except queue.Empty:
                items = []
            if not announced and self.worker.ready:
                self.conn.send(("ready",))
                announced = True
            while not self.outbox.empty():
                items.append(self.outbox.get())
            last = None in items
            items = [item for item in items if item is not None]
            sizes = (self.worker.waiting, self.worker.running, self.worker.kv_bytes())
            if items:
                with self.lock:
                    wired = [self._wire(number, item) for number, item in items]
                self.conn.send(("deliver", wired, *sizes))
            elif sizes != sent:
                self.conn.send(("sizes", *sizes))
            sent = sizes
            if last:
                return

    def _wire(self, number: int, item: object) -> tuple[int, object]:
        """An item as it crosses: a delta as it is, the end as None, an error as (class name, message)."""
        if item is END:
            self.jobs.pop(number, None)
            return number, None
        if isinstance(item, Failure):
            return number, (type(item.error).__name__, str(item.error))
        return number, item

