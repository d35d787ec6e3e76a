"""The server stays available: a client that leaves (mid-stream, or while waiting for a whole answer) frees the
engine at the next decode step; /health answers at once while requests wait; a full queue is a 429; engine errors
are OpenAI-style errors (an error event mid-stream); oversized bodies and huge prompts are refused cheaply."""

import json
import socket
import statistics
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from helpers import tiny_config  # noqa: E402
from minimind_v import MiniMindVLM  # noqa: E402
from minimind_v.generation import Engine  # noqa: E402
from minimind_v.serving.openai_api import ServerSettings, create_app  # noqa: E402
from test_server import live_server  # noqa: E402

ASK = [{"role": "user", "content": "tell me a long story"}]
BODY_LIMIT = 400_000


class Steps:
    """Counts the server's decode steps (each slowed by `delay` s) and can make one fail."""

    def __init__(self, batch, delay: float = 0.01):
        self.count, self.delay, self.fail_at = 0, delay, None
        real = batch.step

        def step():
            self.count += 1
            if self.fail_at is not None and self.count >= self.fail_at:
                raise RuntimeError("injected engine failure")
            time.sleep(self.delay)
            return real()

        batch.step = step

    def settle(self, quiet: float = 0.4, timeout: float = 30) -> int:
        """Wait until no step has run for `quiet` seconds; the count then."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            before = self.count
            time.sleep(quiet)
            if self.count == before:
                return before
        raise AssertionError("the engine kept decoding")


@pytest.fixture(scope="module")
def slow(clip_dir, tokenizer):
    torch.manual_seed(0)
    engine = Engine(MiniMindVLM(tiny_config(vocab_size=len(tokenizer)), vision_model_path=clip_dir), tokenizer)
    engine.eos_ids = set()  # every answer runs to its max_tokens
    app = create_app(engine, ServerSettings(model_name="tiny", max_images=2, max_image_bytes=200_000,
                                            max_body_bytes=BODY_LIMIT, max_batch=1))
    steps = Steps(app.state.worker.batch)
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        yield {"url": url, "addr": (host, int(port)), "engine": engine, "steps": steps,
               "worker": app.state.worker}


@pytest.fixture
def client(slow):
    slow["steps"].settle()
    return openai.OpenAI(base_url=slow["url"] + "/v1", api_key="unused", max_retries=0, timeout=10)


def post(url: str, body: dict | bytes, timeout: float = 10) -> tuple[int, object, dict]:
    """(status, headers, JSON body) of a POST to /v1/chat/completions."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


def open_request(addr, max_tokens: int = 400, stream: bool = False) -> socket.socket:
    """A raw connection with a chat request sent and not read: close it to leave."""
    body = json.dumps({"model": "tiny", "messages": ASK, "max_tokens": max_tokens, "stream": stream}).encode()
    sock = socket.create_connection(addr)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def wait_until(condition, timeout: float = 15) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_a_dropped_stream_frees_the_engine(slow, client):
    steps = slow["steps"]
    stream = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=400, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)  # the role chunk and the first text
    stream.close()  # the client leaves
    before, start = steps.count, time.time()
    reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3)
    assert time.time() - start < 1.0, "the next request waited behind the abandoned stream"
    assert reply.choices[0].finish_reason == "length"
    assert steps.settle() - before < 100  # the dropped stream did not decode its 400 tokens


def test_a_client_that_disconnects_stops_its_request(slow, client):
    steps = slow["steps"]
    start = steps.count
    sock = open_request(slow["addr"], max_tokens=400)  # not streamed: nothing is written until the end
    wait_until(lambda: steps.count > start + 5)
    sock.close()
    time.sleep(0.5)  # the server checks every 0.1 s, then the engine stops at its next step
    stopped = steps.count
    time.sleep(0.5)
    assert steps.count == stopped and stopped - start < 100


def test_health_answers_at_once_while_requests_wait(slow, client):
    """48 long requests in flight (one decoding, the rest queued) would have taken every thread of a synchronous
    handler's pool: /health waited behind them. Now it is answered on the event loop."""
    socks = [open_request(slow["addr"]) for _ in range(48)]
    try:
        wait_until(lambda: slow["worker"].waiting >= 40)
        times = []
        for _ in range(10):
            start = time.time()
            with urllib.request.urlopen(slow["url"] + "/health", timeout=5) as response:
                assert json.loads(response.read())["status"] == "ok"
            times.append(time.time() - start)
        with urllib.request.urlopen(slow["url"] + "/ready", timeout=5) as response:
            assert json.loads(response.read())["waiting"] >= 40
    finally:
        for sock in socks:
            sock.close()
    assert statistics.median(times) < 0.25 and max(times) < 1.0, times
    slow["steps"].settle()
    wait_until(lambda: slow["worker"].waiting == 0)  # the waiting requests of the gone clients were dropped


def test_a_full_queue_is_a_429_with_retry_after(slow, client, monkeypatch):
    monkeypatch.setattr(slow["worker"], "max_queue", 2)
    steps, start = slow["steps"], slow["steps"].count
    socks = [open_request(slow["addr"])]
    try:
        wait_until(lambda: steps.count > start)  # one decoding,
        socks += [open_request(slow["addr"]) for _ in range(2)]
        wait_until(lambda: slow["worker"].waiting == 2)  # two waiting
        status, headers, body = post(slow["url"], {"model": "tiny", "messages": ASK, "max_tokens": 2})
    finally:
        for sock in socks:
            sock.close()
    assert status == 429 and headers["Retry-After"] == "1"
    assert body["error"]["code"] == "server_busy" and body["error"]["type"] == "rate_limit_error"


def sse(url: str, body: dict) -> list[str]:
    """The data lines of a streamed answer."""
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return [line.removeprefix("data: ") for line in response.read().decode().split("\n\n") if line]


def test_an_engine_error_mid_stream_ends_with_an_error_event_and_done(slow, client):
    steps = slow["steps"]
    steps.fail_at = steps.count + 4
    try:
        events = sse(slow["url"], {"model": "tiny", "messages": ASK, "max_tokens": 50, "stream": True,
                                   "temperature": 0})
        status, _, body = post(slow["url"], {"model": "tiny", "messages": ASK, "max_tokens": 50})
    finally:
        steps.fail_at = None
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "internal_error" and "injected engine failure" in error["message"]
    assert any(json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2])  # it failed mid-way
    assert status == 500 and body["error"]["code"] == "internal_error" and body["error"]["type"] == "server_error"
    reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3)  # the worker goes on
    assert reply.usage.completion_tokens == 3


def test_oversized_bodies_are_refused(slow, client):
    with socket.create_connection(slow["addr"]) as sock:  # the declared length is enough: nothing is read
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (BODY_LIMIT + 1))
        assert status_and_body(sock) == (413, "request_too_large")
    with socket.create_connection(slow["addr"]) as sock:  # no length: counted as it arrives
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(BODY_LIMIT // 50_000 + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (50_000, b" " * 50_000))
        except OSError:  # the server may answer and close before the rest arrives
            pass
        assert status_and_body(sock) == (413, "request_too_large")


def status_and_body(sock: socket.socket) -> tuple[int, str]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        more = sock.recv(65536)
        if not more:
            break
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]["code"]


def test_a_huge_prompt_is_refused_before_tokenizing(slow, client, monkeypatch):
    engine = slow["engine"]
    tokenizer_class, lengths = type(engine.tokenizer), []
    real = tokenizer_class.__call__

    def counting(self, text=None, *args, **kwargs):
        lengths.append(len(text) if isinstance(text, str) else 0)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "__call__", counting)
    huge = "a" * (engine.prompts.max_prompt_chars + 1)
    status, _, body = post(slow["url"], {"model": "tiny", "messages": [{"role": "user", "content": huge}]})
    assert status == 400 and body["error"]["code"] == "invalid_prompt" and "characters" in body["error"]["message"]
    assert not any(n > engine.prompts.max_prompt_chars for n in lengths)
    word = "word " * 400  # within the character bound but over the context: refused from its tokens
    status, _, body = post(slow["url"], {"model": "tiny", "messages": [{"role": "user", "content": word}]})
    assert status == 400 and body["error"]["code"] == "invalid_prompt" and "tokens" in body["error"]["message"]


def test_ready_follows_the_worker(slow, client):
    with urllib.request.urlopen(slow["url"] + "/ready", timeout=5) as response:
        assert response.status == 200 and json.loads(response.read())["status"] == "ready"
    app = create_app(slow["engine"], ServerSettings(model_name="tiny"))
    with live_server(app) as url:
        app.state.worker.stop(timeout=5)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url + "/ready", timeout=5)
        assert caught.value.code == 503 and json.loads(caught.value.read())["error"]["code"] == "not_ready"
        status, _, body = post(url, {"model": "tiny", "messages": ASK, "max_tokens": 2})
        assert status == 503 and body["error"]["code"] == "shutting_down"


def test_a_stream_whose_client_reads_slowly_still_frees_the_engine_when_it_leaves(slow, client):
    """A raw client that sends a streamed request and closes without reading a byte."""
    steps = slow["steps"]
    start = steps.count
    sock = open_request(slow["addr"], stream=True)
    wait_until(lambda: steps.count > start + 5)
    sock.close()
    assert steps.settle() - start < 100
    begin = time.time()
    status, _, body = post(slow["url"], {"model": "tiny", "messages": ASK, "max_tokens": 2}, timeout=5)
    assert status == 200 and time.time() - begin < 1.0
