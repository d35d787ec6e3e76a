"""The OpenAI-compatible server, live on loopback, driven by the official `openai` client (and raw HTTP for what
that client cannot send)."""

import base64
import contextlib
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from helpers import tiny_config  # noqa: E402
from minimind_v import MiniMindVLM  # noqa: E402
from minimind_v.generation import Engine, GenerationRequest, SamplingParams  # noqa: E402
from minimind_v.serving.openai_api import ServerSettings, create_app  # noqa: E402

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, drain: float = 2.0):
    """The app served by uvicorn on a free loopback port in a thread: yields its base URL."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                       timeout_graceful_shutdown=drain))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(clip_dir, tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    engine = Engine(MiniMindVLM(tiny_config(vocab_size=len(tokenizer)), vision_model_path=clip_dir), tokenizer)
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "red.png")
    settings = ServerSettings(model_name="tiny", api_key=KEY, max_images=2, max_image_bytes=50_000,
                              local_image_root=str(root))
    with live_server(create_app(engine, settings)) as url:
        yield {"url": url, "engine": engine, "root": root}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def picture() -> Image.Image:
    return Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(1)) * 255)
                           .to(torch.uint8).numpy())


def with_image(url: str, text: str = "what is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_text_request_matches_the_engine(client, server):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                           temperature=0, max_tokens=8)
    expected = server["engine"].generate([GenerationRequest(messages=[{"role": "user", "content": "hello"}],
                                                            params=SamplingParams(max_new_tokens=8))])[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.prompt_tokens == expected.prompt_tokens and reply.model == "tiny"
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_image_request_with_a_data_url(client, server):
    reply = client.chat.completions.create(model="tiny", messages=with_image(data_url(picture())), temperature=0,
                                           max_tokens=6)
    expected = server["engine"].generate([GenerationRequest(
        messages=[{"role": "user", "content": "<image>what is this?"}], images=[picture()],
        params=SamplingParams(max_new_tokens=6))])[0]
    assert reply.choices[0].message.content == expected.text
    local = client.chat.completions.create(model="tiny", messages=with_image("red.png"), temperature=0, max_tokens=3)
    assert local.usage.prompt_tokens == reply.usage.prompt_tokens  # same prompt shape, image read from the root


def test_streaming_adds_up_to_the_whole_answer(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "tell me"}], temperature=0, max_tokens=10)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0


def test_stop_and_sampling_parameters(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "go on"}], max_tokens=12)
    free = client.chat.completions.create(**kwargs, temperature=0).choices[0].message.content
    stop = free[3:5]
    stopped = client.chat.completions.create(**kwargs, temperature=0, stop=[stop]).choices[0]
    assert stopped.message.content == free[:free.find(stop)] and stopped.finish_reason == "stop"
    sample = lambda seed: client.chat.completions.create(**kwargs, temperature=1.2, top_p=0.95,  # noqa: E731
                                                         seed=seed).choices[0].message.content
    assert sample(7) == sample(7)


def test_concurrent_requests_do_not_corrupt_each_other(client):
    prompts = [f"question number {i}" for i in range(6)]
    ask = lambda p: client.chat.completions.create(  # noqa: E731
        model="tiny", messages=[{"role": "user", "content": p}], temperature=0, max_tokens=8).choices[0].message.content
    alone = [ask(p) for p in prompts]
    results = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(prompts[i]))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


@pytest.mark.parametrize("messages, status, code", [
    (with_image("data:image/png;base64,@@not-base64@@"), 400, "invalid_base64"),
    (with_image("data:image/png;base64," + base64.b64encode(b"definitely not an image").decode()), 400,
     "invalid_image"),
    (with_image("https://example.com/cat.png"), 400, "remote_url_refused"),
    (with_image("../outside.png"), 400, "local_path_refused"),
    (with_image("data:image/png;base64," + "A" * 80_000), 413, "image_too_large"),
    (with_image(data_url(picture())) + with_image(data_url(picture())) + with_image(data_url(picture())), 400,
     "too_many_images"),
    ([{"role": "user", "content": "word " * 400}], 400, "invalid_prompt"),
])
def test_bad_requests_get_openai_style_errors(client, messages, status, code):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert caught.value.status_code == status
    assert caught.value.body["code"] == code and caught.value.body["message"]


def test_remote_images_are_fetched_only_when_configured(server, tmp_path):
    import http.server
    import functools

    from minimind_v.serving.image_input import load_image_url
    from minimind_v.serving.protocol import APIError

    picture().save(tmp_path / "p.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/p.png"
    try:
        with pytest.raises(APIError, match="not fetched"):
            load_image_url(url, ServerSettings())
        fetched = load_image_url(url, ServerSettings(fetch_remote_images=True))
        assert fetched.size == (32, 32) and fetched.tobytes() == picture().tobytes()
        with pytest.raises(APIError) as caught:
            load_image_url(url, ServerSettings(fetch_remote_images=True, max_image_bytes=100))
        assert caught.value.status == 413
        with pytest.raises(APIError, match="could not fetch"):
            load_image_url(url + ".missing", ServerSettings(fetch_remote_images=True))
    finally:
        httpd.shutdown()


def test_unknown_model_missing_key_and_malformed_json(client, server):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, body = http(server["url"] + "/v1/chat/completions", b'{"model": "tiny", "messages": [', headers)
    assert status == 400 and body["error"]["code"] == "invalid_json"
    for request in ({"model": "tiny"}, {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
                    {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}):
        status, body = http(server["url"] + "/v1/chat/completions", json.dumps(request).encode(), headers)
        assert status == 400 and body["error"]["message"]
    assert http(server["url"] + "/health")[1]["status"] == "ok"
    assert http(server["url"] + "/v1/nothing", headers=headers)[0] == 404


def http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """A raw request (the openai client cannot send malformed JSON): (status, JSON body)."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
