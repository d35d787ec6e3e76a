"""Out-of-range values are 400s with the OpenAI error body, never a 500 or a NaN: sampling values (checked in
SamplingParams, so chat, web and the CLI get them too), and images that would cost far more memory than their bytes
(each refused from its header with its own code). Queued requests hold pixel values, not decoded pictures."""

import asyncio
import base64
import io
import json
import time

import pytest
import torch
from PIL import Image

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from helpers import tiny_config  # noqa: E402
from minimind_v import MiniMindVLM  # noqa: E402
from minimind_v.generation import Engine, SamplingError, SamplingParams  # noqa: E402
from minimind_v.serving.openai_api import ServerSettings, create_app  # noqa: E402
from test_server import data_url, http, live_server, with_image  # noqa: E402

HEADERS = {"Content-Type": "application/json"}
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(clip_dir, tokenizer):
    torch.manual_seed(0)
    engine = Engine(MiniMindVLM(tiny_config(vocab_size=len(tokenizer)), vision_model_path=clip_dir), tokenizer)
    with live_server(create_app(engine, ServerSettings(model_name="tiny", max_image_bytes=50_000))) as url:
        yield {"url": url, "engine": engine}


def ask(server, fields: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    body = raw or json.dumps({"model": "tiny", "messages": HELLO, "max_tokens": 4, **(fields or {})}).encode()
    return http(server["url"] + "/v1/chat/completions", body, HEADERS)


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 1e-45}, "temperature"),  # logits / 1e-45 overflow: NaN probabilities
    ({"temperature": 101}, "temperature"),
    ({"temperature": 1.0, "repetition_penalty": 1e-45}, "repetition_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"temperature": 1.0, "seed": 2**70}, "seed"),  # over the generator's 64 bits
    ({"temperature": 1.0, "seed": -2**63 - 1}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),  # 0 is a value, not "missing"
    ({"max_tokens": 5, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": "x" * 257}, "stop"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_out_of_range_sampling_values_are_400s(server, fields, param, stream):
    status, body = ask(server, {**fields, "stream": stream})  # a stream is refused before it starts
    assert status == 400, body
    assert body["error"]["code"] == "invalid_sampling_parameters" and body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


@pytest.mark.parametrize("literal, param", [("NaN", "temperature"), ("Infinity", "top_p"),
                                            ("-Infinity", "repetition_penalty")])
def test_nan_and_infinity_are_400s(server, literal, param):
    """Python's json and pydantic accept these literals; the sampling check does not."""
    raw = ('{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], '
           f'"{param}": {literal}}}').encode()
    status, body = ask(server, raw=raw)
    assert status == 400 and body["error"]["code"] == "invalid_sampling_parameters"
    assert body["error"]["param"] == param


@pytest.mark.parametrize("fields", [
    {"temperature": 1.0, "seed": -2**63}, {"temperature": 1.0, "seed": 2**63 - 1},
    {"temperature": 100, "top_p": 1e-9, "seed": 1}, {"temperature": 1e-5, "repetition_penalty": 0.01, "seed": 2},
    {"temperature": 1.0, "repetition_penalty": 100, "top_k": 10**12, "seed": 3},
])
def test_values_at_the_edges_of_the_ranges_sample_text(server, fields):
    status, body = ask(server, fields)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampling_params_name_the_bad_field():
    for kwargs, field in [(dict(temperature=float("nan")), "temperature"), (dict(top_k=True), "top_k"),
                          (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(stop="abc"), "stop"),
                          (dict(seed=2**63), "seed"), (dict(repetition_penalty=float("inf")), "repetition_penalty")]:
        with pytest.raises(SamplingError) as caught:
            SamplingParams(**kwargs)
        assert caught.value.field == field and field in str(caught.value)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)


def png(size: tuple[int, int], mode: str = "L") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("size, mode, code", [
    ((4096, 1), "L", "image_shape_refused"),  # ~80 bytes that an image processor would blow up to GBs
    ((1, 16384), "L", "image_shape_refused"),
    ((1, 65536), "L", "image_shape_refused"),
    ((5000, 5000), "1", "image_too_large_in_pixels"),  # 25 MP in a few kB
])
def test_tiny_files_of_huge_images_are_refused_from_their_header(server, size, mode, code):
    url = png(size, mode)
    assert len(url) < 20_000
    start = time.time()
    status, body = ask(server, {"messages": with_image(url)})
    assert status == 400 and body["error"]["code"] == code, body
    assert time.time() - start < 2.0


def test_queued_requests_hold_pixel_values(server):
    """The decoded picture is dropped once the tower's pixel values are made: a waiting request holds [3, H, W]."""
    from minimind_v.serving.image_input import ImageDecoder
    from minimind_v.serving.openai_api import ChatCompletionRequest, ServerSettings, to_generation_request

    engine = server["engine"]
    big = Image.new("RGB", (2000, 1500), (10, 200, 30))
    body = ChatCompletionRequest(model="tiny", messages=with_image(data_url(big)), max_tokens=3)
    settings = ServerSettings(model_name="tiny", max_image_bytes=2**22)
    decoder = ImageDecoder(engine, settings)
    try:
        request = asyncio.run(to_generation_request(body, settings, engine, decoder))
    finally:
        decoder.close()
    (pixels,) = request.images
    assert isinstance(pixels, torch.Tensor) and pixels.shape == (3, 32, 32)
    from minimind_v.serving.image_input import load_image_url

    assert torch.equal(pixels, engine.pixel_values(load_image_url(data_url(big), settings)))
