"""The engine worker in a process of its own (`serve --engine-process`): the same answers as the engine in this
process, from threads and event loops; a cancelled job frees its slot; a full queue is busy; a prompt longer than a
slot is refused at submit; an engine process that dies ends every open job with an error; the server over it."""

import argparse
import asyncio
import functools
import os
import signal
import time

import pytest

from minimind_v.cli.serving import engine_for
from minimind_v.generation import Engine, GenerationRequest, RequestError, SamplingParams, ServerBusy, WorkerStopped
from minimind_v.generation.engine_process import EngineProcess


def model_args(model_dir) -> argparse.Namespace:
    return argparse.Namespace(model=str(model_dir), tokenizer=None, vision=None, device="cpu", dtype="fp32", int8=False,
                              set=[], compile=False)


def ask(prompt: str, tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": prompt}],
                             params=SamplingParams(max_new_tokens=tokens, ignore_eos=True))


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def front(model_dir) -> Engine:
    return engine_for(model_args(model_dir), announce=False)


def start(front, model_dir, **options) -> EngineProcess:
    worker = EngineProcess(front, functools.partial(engine_for, model_args(model_dir), announce=False), **options)
    wait_for(lambda: worker.ready or not worker.alive)
    assert worker.ready
    return worker


def test_answers_as_the_engine_here_to_threads_and_event_loops(front, model_dir):
    prompts = [f"tell me about {word}" for word in ("cats", "the sea", "red squares", "a long road")]
    alone = [front.generate([ask(p)])[0].text for p in prompts]
    worker = start(front, model_dir, max_batch=2, max_queue=8)
    try:
        jobs = [worker.submit(ask(p)) for p in prompts]  # more than the batch: they join it as slots free
        assert [job.result().text for job in jobs] == alone

        async def on_a_loop():
            loop = asyncio.get_running_loop()
            return [(await worker.submit(ask(p), loop).aresult()).text for p in prompts[:2]]

        assert asyncio.run(on_a_loop()) == alone[:2]
        wait_for(lambda: worker.running == 0 and worker.waiting == 0)
        assert worker.slots == 2 and worker.kv_bytes() > 0
    finally:
        assert worker.stop(timeout=30)
    assert not worker.alive
    with pytest.raises(WorkerStopped):
        worker.submit(ask("again"))


def slow_engine(args: argparse.Namespace) -> Engine:
    """(built in the engine process) The model's engine, 10 ms a step slower: a long answer runs long enough."""
    engine = engine_for(args, announce=False)
    engine.model.decoder_layers()[0].register_forward_pre_hook(lambda *_: time.sleep(0.01))
    return engine


def test_cancel_frees_the_slot_and_a_full_queue_is_busy(front, model_dir):
    worker = EngineProcess(front, functools.partial(slow_engine, model_args(model_dir)), max_batch=1, max_queue=1,
                           max_len=300)
    try:
        long = worker.submit(ask("a long answer", tokens=280))  # submitted before the engine is ready: it waits
        waiting = worker.submit(ask("next", tokens=4))
        with pytest.raises(ServerBusy):
            worker.submit(ask("one too many"))
        with pytest.raises(RequestError, match="tokens per request"):
            worker.submit(ask("word " * 70))  # ~350 tokens: in the model's context, not in a slot
        wait_for(lambda: worker.running == 1 and worker.waiting == 1)
        long.cancel()
        assert long.result().finish_reason == "cancelled"
        assert waiting.result().finish_reason == "length"  # it got the freed slot
    finally:
        worker.stop(timeout=30)


def test_a_dead_engine_process_ends_every_open_job(front, model_dir):
    worker = start(front, model_dir, max_batch=2, max_queue=4)
    try:
        job = worker.submit(ask("a long answer", tokens=400))
        wait_for(lambda: worker.running == 1)
        os.kill(worker._process.pid, signal.SIGKILL)
        with pytest.raises(WorkerStopped, match="engine process ended"):
            job.result()
        wait_for(lambda: not worker.alive)
        assert not worker.ready
        with pytest.raises(WorkerStopped):
            worker.submit(ask("again"))
    finally:
        worker.stop(timeout=10)


def test_an_engine_that_cannot_be_built_is_not_ready(front, tmp_path):
    broken = argparse.Namespace(**{**vars(model_args(tmp_path / "missing")), "model": str(tmp_path / "missing")})
    worker = EngineProcess(front, functools.partial(engine_for, broken, announce=False))
    wait_for(lambda: not worker.alive)
    assert not worker.ready
    worker.stop(timeout=10)


def test_the_server_over_an_engine_process_answers_and_leaves_no_process_behind(model_dir, front, capsys):
    """`serve --engine-process` under `bench serve` (streams with images), the same greedy answer as the engine
    here, /metrics, then a SIGKILLed server: its engine process notices and exits."""
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("uvicorn")
    import http.client
    import json

    from minimind_v.bench.serve import start_server
    from minimind_v.cli import main

    process, url = start_server(str(model_dir), "tiny", ["--engine-process"], wait=120)
    try:
        port = int(url.rsplit(":", 1)[1])
        children = psutil.Process(process.pid).children()  # the engine process (and multiprocessing's tracker)
        assert sum("resource_tracker" not in " ".join(child.cmdline()) for child in children) == 1
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/v1/chat/completions", json.dumps({
            "model": "tiny", "max_tokens": 12, "temperature": 0, "messages": [{"role": "user", "content": "hello"}]}),
            {"Content-Type": "application/json"})
        answer = json.loads(connection.getresponse().read())["choices"][0]["message"]["content"]
        expected = front.generate([GenerationRequest(messages=[{"role": "user", "content": "hello"}],
                                                     params=SamplingParams(max_new_tokens=12))])[0].text
        assert answer == expected
        assert main(["bench", "serve", "--url", url, "--model-name", "tiny", "--clients", "6", "--seconds", "2",
                     "--max-tokens", "8", "--image", str(model_dir.parent / "blue.png"), "--stream", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["requests"]["ok"] >= 6 and report["requests"]["failed"] == 0
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
        assert "minimind_v_batch_slots 64.0" in metrics and "minimind_v_kv_pool_bytes" in metrics
        process.kill()  # no shutdown at all: the engine process finds its pipe closed
        process.wait(10)
        psutil.wait_procs(children, timeout=15)
        assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    finally:
        process.kill()
