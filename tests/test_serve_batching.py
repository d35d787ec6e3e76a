"""The server under many clients: 32 concurrent `openai` clients (streamed and not, with and without images) get
every answer, each greedy answer the same as the request alone; /metrics parses with prometheus-client's parser and
counts what happened; a request past the time-out is a 504 (an error event in a stream); one access-log line per
request."""

import base64
import concurrent.futures
import io
import json
import logging
import time
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

from helpers import tiny_config  # noqa: E402
from minimind_v import MiniMindVLM  # noqa: E402
from minimind_v.generation import Engine, GenerationRequest, SamplingParams  # noqa: E402
from minimind_v.serving.openai_api import ServerSettings, create_app  # noqa: E402
from test_server import live_server  # noqa: E402

COLORS = [(220, 30, 30), (30, 200, 40), (20, 60, 230), (240, 220, 20)]


def data_url(color) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def question(i: int) -> tuple[list[dict], GenerationRequest]:
    """The i-th client's chat message (an image for every other one) and the same request for the engine."""
    text = f"question {i}: " + "what is this? " * (i % 4 + 1)
    if i % 2:
        return [{"role": "user", "content": text}], GenerationRequest(
            messages=[{"role": "user", "content": text}], params=SamplingParams(max_new_tokens=6 + i % 5))
    color = COLORS[i // 2 % 4]
    content = [{"type": "image_url", "image_url": {"url": data_url(color)}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}], GenerationRequest(
        messages=[{"role": "user", "content": "<image>" + text}], images=[Image.new("RGB", (32, 32), color)],
        params=SamplingParams(max_new_tokens=6 + i % 5))


@pytest.fixture(scope="module")
def served(clip_dir, tokenizer):
    torch.manual_seed(0)
    engine = Engine(MiniMindVLM(tiny_config(vocab_size=len(tokenizer)), vision_model_path=clip_dir), tokenizer)
    app = create_app(engine, ServerSettings(model_name="tiny", max_batch=8, max_queue=64))
    with live_server(app) as url:
        yield {"url": url, "engine": engine, "app": app}


def metrics(url: str) -> dict:
    """{(name, labels as a sorted tuple): value} from /metrics, through prometheus-client's own parser."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def test_32_concurrent_openai_clients_get_every_answer_as_each_alone(served):
    engine = served["engine"]
    expected = [engine.generate([question(i)[1]])[0].text for i in range(32)]
    before = metrics(served["url"])

    def ask(i: int) -> str:
        client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages, request = question(i)
        if i % 3 == 0:  # streamed
            stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0, stream=True,
                                                    max_tokens=request.params.max_new_tokens)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                               max_tokens=request.params.max_new_tokens)
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert answers == expected
    after = metrics(served["url"])
    ok = ("minimind_v_requests_total", (("status", "200"),))
    assert after[ok] - before.get(ok, 0) == 32
    generated = sum(engine.generate([question(i)[1]])[0].completion_tokens for i in range(32))
    counted = ("minimind_v_generation_tokens_total", ())
    assert after[counted] - before.get(counted, 0) == generated
    assert after[("minimind_v_batch_slots", ())] == 8
    pool = served["app"].state.worker.batch.pool  # 8 slots x the context, keys and values of every layer
    assert after[("minimind_v_kv_pool_bytes", ())] == pool.bytes() == 8 * 512 * 2 * 2 * 2 * 16 * 4
    assert after[("minimind_v_time_to_first_token_seconds_count", ())] >= 32
    assert after[("minimind_v_queue_length", ())] == 0 and after[("minimind_v_running_batch_size", ())] == 0


def test_a_refused_request_is_counted_and_logged(served, caplog):
    before = metrics(served["url"]).get(("minimind_v_requests_total", (("status", "400"),)), 0)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode()
    request = urllib.request.Request(served["url"] + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with caplog.at_level(logging.INFO, logger="minimind_v.access"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 400
        time.sleep(0.1)
    assert metrics(served["url"])[("minimind_v_requests_total", (("status", "400"),))] == before + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "minimind_v.access"]
    assert any("POST /v1/chat/completions 400" in line for line in lines), lines


def test_an_answer_logs_its_tokens_and_first_token_time(served, caplog):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=30)
    with caplog.at_level(logging.INFO, logger="minimind_v.access"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=3,
                                       temperature=0)
        time.sleep(0.1)
    (line,) = [r.getMessage() for r in caplog.records if "POST /v1/chat/completions 200" in r.getMessage()]
    assert "prompt=" in line and "completion=" in line and "ttft=" in line


@pytest.fixture(scope="module")
def impatient(clip_dir, tokenizer):
    """A server whose requests time out after 0.5 s, over an engine whose steps take 20 ms and never see EOS."""
    torch.manual_seed(0)
    engine = Engine(MiniMindVLM(tiny_config(vocab_size=len(tokenizer)), vision_model_path=clip_dir), tokenizer)
    engine.eos_ids = set()
    app = create_app(engine, ServerSettings(model_name="tiny", max_batch=2, request_timeout=0.5))
    batch, real = app.state.worker.batch, app.state.worker.batch.step
    batch.step = lambda: (time.sleep(0.02), real())[1]
    with live_server(app) as url:
        yield url, app.state.worker


def test_a_request_past_the_timeout_is_a_504_and_frees_its_slot(impatient):
    url, worker = impatient
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.time()
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 504 and json.loads(caught.value.read())["error"]["code"] == "request_timeout"
    assert 0.5 <= time.time() - start < 3 and worker.running == 0
    streamed = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                      headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(streamed, timeout=30) as response:
        events = [line[6:].strip().decode() for line in response if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert any('"content": "' in e and '"content": ""' not in e for e in events)  # text came before the time-out


def test_clients_that_leave_mid_stream_free_their_slots_and_the_others_answer_as_alone(served, monkeypatch):
    import http.client

    engine, worker = served["engine"], served["app"].state.worker
    host, port = served["url"].removeprefix("http://").split(":")
    prompts = [f"story number {i}" for i in range(12)]
    alone = [engine.generate([GenerationRequest(messages=[{"role": "user", "content": p}],
                                                params=SamplingParams(max_new_tokens=40))])[0].text for p in prompts]

    def stream(i: int) -> str | None:
        """Client i reads its stream to the end, or (odd i) leaves after the first chunk; what it read."""
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        body = {"model": "tiny", "stream": True, "max_tokens": 40, "temperature": 0,
                "messages": [{"role": "user", "content": prompts[i]}]}
        if i % 2:  # would run to the context (about 490 tokens) unless its leaving cancels it
            body.update(max_tokens=2000, ignore_eos=True)
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        text = ""
        for line in connection.getresponse():
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:])["choices"]
                text += choices[0]["delta"].get("content") or "" if choices else ""
                if i % 2:
                    connection.close()  # gone mid-stream
                    return None
        return text

    steps, real = [0], worker.batch.step

    def counting_step():
        steps[0] += 1
        return real()

    monkeypatch.setattr(worker.batch, "step", counting_step)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        texts = list(pool.map(stream, range(12)))
    assert [texts[i] for i in range(0, 12, 2)] == [alone[i] for i in range(0, 12, 2)]
    deadline = time.time() + 5
    while worker.running and time.time() < deadline:
        time.sleep(0.02)
    assert worker.running == 0 and worker.batch.free == worker.batch.pool.slots
    assert steps[0] < 200  # the six that left stopped within a few steps, not after some 490
