"""Cancellation in the engine, and the worker thread that owns an engine: it answers as the engine does (to a
thread or to an event loop), drops cancelled waiting jobs unrun, stops a running job at the next step, delivers an
engine error to its job and goes on, refuses work when its queue is full or it has stopped."""

import asyncio
import threading
import time

import pytest
import torch

from helpers import tiny_config
from minimind_v import MiniMindVLM
from minimind_v.generation.scheduler import ContinuousBatch
from minimind_v.generation import (Engine, EngineWorker, GenerationRequest, RequestError, SamplingParams, ServerBusy,
                                   WorkerStopped)


@pytest.fixture(scope="module")
def engine(clip_dir, tokenizer):
    torch.manual_seed(0)
    return Engine(MiniMindVLM(tiny_config(vocab_size=len(tokenizer)), vision_model_path=clip_dir), tokenizer)


@pytest.fixture
def counted(engine, monkeypatch):
    """Counts prefills and decode steps (each slowed by 5 ms); `fail` makes the next prefill raise."""
    calls = {"prefill": 0, "steps": 0, "fail": False}
    prefill, step = ContinuousBatch._prefill, ContinuousBatch.step

    def counting_prefill(self, running, slots):
        calls["prefill"] += 1
        if calls.pop("fail", False):
            raise RuntimeError("injected prefill failure")
        return prefill(self, running, slots)

    def counting_step(self):
        calls["steps"] += 1
        time.sleep(0.005)
        return step(self)

    monkeypatch.setattr(ContinuousBatch, "_prefill", counting_prefill)
    monkeypatch.setattr(ContinuousBatch, "step", counting_step)
    monkeypatch.setattr(engine, "eos_ids", set())  # answers run to their max_new_tokens
    return calls


def ask(prompt: str = "tell me", tokens: int = 8, **sampling) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": prompt}],
                             params=SamplingParams(max_new_tokens=tokens, **sampling))


@pytest.fixture
def engine_counted(engine, monkeypatch):
    """Counts the engine's own prefills and decode steps (its static batches: chat, eval, bench decode)."""
    calls = {"prefill": 0, "steps": 0}
    prefill, advance = engine._prefill, engine._advance

    def counting_prefill(rows, requests):
        calls["prefill"] += 1
        return prefill(rows, requests)

    def counting_advance(*args):
        calls["steps"] += 1
        return advance(*args)

    monkeypatch.setattr(engine, "_prefill", counting_prefill)
    monkeypatch.setattr(engine, "_advance", counting_advance)
    monkeypatch.setattr(engine, "eos_ids", set())
    return calls


def test_a_cancelled_request_ends_at_the_next_step(engine, engine_counted):
    counted = engine_counted
    early = ask()
    early.cancel = threading.Event()
    early.cancel.set()
    (only,) = list(engine.stream([early]))
    assert only.result.finish_reason == "cancelled" and only.result.token_ids == [] and counted["prefill"] == 0
    running, other = ask(tokens=300), ask("another one", tokens=12)
    running.cancel = threading.Event()
    texts, results = [], {}
    for delta in engine.stream([running, other]):
        texts.append(delta.text) if delta.index == 0 else None
        if delta.result is not None:
            results[delta.index] = delta.result
        if counted["steps"] == 3:
            running.cancel.set()
    assert results[0].finish_reason == "cancelled" and len(results[0].token_ids) <= 5
    assert results[0].text == "".join(texts)  # what was released, no more
    assert results[1].finish_reason == "length"
    assert results[1].token_ids == engine.generate([ask("another one", tokens=12)])[0].token_ids


def test_the_worker_answers_as_the_engine_does_to_threads_and_event_loops(engine):
    worker = EngineWorker(engine)
    try:
        expected = engine.generate([ask(tokens=10)])[0]
        job = worker.submit(ask(tokens=10))
        deltas = list(job)
        assert "".join(d.text for d in deltas) == expected.text and deltas[-1].result.token_ids == expected.token_ids

        async def on_a_loop():
            job = worker.submit(ask(tokens=10), asyncio.get_running_loop())
            return [delta async for delta in job]

        on_loop = asyncio.run(on_a_loop())
        assert "".join(d.text for d in on_loop) == expected.text and on_loop[-1].result.token_ids == expected.token_ids
    finally:
        assert worker.stop(timeout=5)


def test_cancelled_jobs_waiting_are_dropped_and_running_ones_stop(engine, counted):
    worker = EngineWorker(engine, max_batch=1)  # one slot: the second request waits
    try:
        long = worker.submit(ask(tokens=400))
        waiting = worker.submit(ask("never run"))
        deadline = time.time() + 10
        while counted["steps"] < 3:
            assert time.time() < deadline
            time.sleep(0.01)
        waiting.cancel()
        long.cancel()
        assert waiting.result() is None
        assert long.result().finish_reason == "cancelled" and counted["steps"] < 50
        assert counted["prefill"] == 1  # the cancelled waiting job never reached the engine
    finally:
        worker.stop(timeout=5)


def test_an_engine_error_goes_to_its_job_and_the_worker_goes_on(engine, counted):
    worker = EngineWorker(engine)
    try:
        counted["fail"] = True
        with pytest.raises(RuntimeError, match="injected prefill failure"):
            worker.submit(ask()).result()
        assert worker.alive and worker.submit(ask(tokens=4)).result().completion_tokens == 4
    finally:
        worker.stop(timeout=5)


def test_a_full_queue_is_busy_and_stop_ends_everything(engine, counted):
    worker = EngineWorker(engine, max_queue=1, max_batch=1)
    running = worker.submit(ask(tokens=400))
    while counted["prefill"] == 0:
        time.sleep(0.01)
    waiting = worker.submit(ask())
    with pytest.raises(ServerBusy):
        worker.submit(ask())
    waiting.cancel()
    worker.submit(ask())  # a cancelled job does not hold a place
    start = time.time()
    assert worker.stop(timeout=5) and time.time() - start < 1.0  # the running job stopped at its next step
    assert running.result().finish_reason == "cancelled" and not worker.alive
    with pytest.raises(WorkerStopped):
        worker.submit(ask())


def test_batches_of_waiting_requests_answer_as_each_alone(engine):
    worker = EngineWorker(engine, max_batch=4)
    prompts = [f"question number {i}" for i in range(5)]
    try:
        alone = [engine.generate([ask(p, tokens=6)])[0].token_ids for p in prompts]
        jobs = [worker.submit(ask(p, tokens=6)) for p in prompts]
        assert [job.result().token_ids for job in jobs] == alone
    finally:
        worker.stop(timeout=5)


def test_requests_past_their_timeout_end_waiting_or_running(engine, counted):
    worker = EngineWorker(engine, max_batch=1)
    try:
        holder = worker.submit(ask(tokens=400))  # no time-out: it holds the only slot
        worker.timeout = 0.3
        late = worker.submit(ask("never run")).result()
        assert late.finish_reason == "timeout" and late.token_ids == [] and late.prompt_tokens > 0
        assert counted["prefill"] == 1  # the waiting one never reached the engine
        holder.cancel()
        assert holder.result().finish_reason == "cancelled"
        cut = worker.submit(ask(tokens=400)).result()
        assert cut.finish_reason == "timeout" and 0 < len(cut.token_ids) < 400 and worker.running == 0
    finally:
        worker.stop(timeout=5)


def test_a_prompt_longer_than_a_slot_is_refused_at_submit(engine):
    worker = EngineWorker(engine, max_len=16)
    try:
        with pytest.raises(RequestError, match="at most 16 tokens per request"):
            worker.submit(ask("a long question " * 10))
        assert worker.waiting == 0
    finally:
        worker.stop(timeout=5)


def test_an_overlapped_worker_answers_as_each_alone_cancels_and_stops(engine):
    """The GPU's way (a step launched before the previous one is handed over), here on the CPU: the same answers,
    a cancelled job ends, stop() ends the rest."""
    worker = EngineWorker(engine, max_batch=4)
    worker.batch.overlap = True
    prompts = [f"question number {i}" for i in range(6)]
    try:
        alone = [engine.generate([ask(p, tokens=5 + i)])[0].token_ids for i, p in enumerate(prompts)]
        jobs = [worker.submit(ask(p, tokens=5 + i)) for i, p in enumerate(prompts)]
        assert [job.result().token_ids for job in jobs] == alone
        long, other = worker.submit(ask(tokens=400)), worker.submit(ask(tokens=400))
        first = next(iter(long))  # running
        long.cancel()
        result = long.result()
        assert result.finish_reason == "cancelled" and first.text is not None and len(result.token_ids) < 400
    finally:
        assert worker.stop(timeout=5)
    assert other.result().finish_reason == "cancelled" and worker.running == 0
