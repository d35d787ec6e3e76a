"""`minimind-v serve`: an OpenAI-compatible HTTP API (FastAPI) over the generation engine.

    GET  /health                 liveness
    GET  /v1/models              the one model served
    POST /v1/chat/completions    OpenAI chat format: text and image_url content parts, stream (server-sent events),
                                 temperature, top_p, max_tokens / max_completion_tokens, stop, seed
                                 (+ top_k and repetition_penalty, as vLLM accepts them)

Every bad request gets a 4xx with an OpenAI-style body {"error": {"message", "type", "param", "code"}}. Requests
queue on the engine's lock, so concurrent clients never share a KV cache.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.processing import IMAGE_MARKER
from ..generation import Engine, GenerationRequest, RequestError, SamplingParams
from .chat import open_image


@dataclass
class ServerSettings:
    model_name: str = "minimind-v"
    api_key: str | None = None
    local_image_root: str | None = None  # local file paths are read only from under this folder, when set
    fetch_remote_images: bool = False  # http(s) image URLs are refused unless this is set
    max_images: int = 4
    max_image_bytes: int = 10 * 2**20
    default_max_tokens: int = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    n: int = 1


def error_body(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def load_image_url(url: str, settings: ServerSettings):
    """A data: URL (base64) or, when allowed, a local path -> RGB image; APIError otherwise."""
    if url.startswith(("http://", "https://")):
        if not settings.fetch_remote_images:
            raise APIError(400, "remote image URLs are not fetched by this server (start it with "
                                "--fetch-remote-images); send the image as a data:image/...;base64 URL",
                           "remote_url_refused", "messages")
        return _image(fetch(url, settings.max_image_bytes))
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise APIError(400, "image data URLs must be data:<type>;base64,<data>", "invalid_image_url", "messages")
        if len(payload) * 3 // 4 > settings.max_image_bytes:
            raise APIError(413, f"image is over the {settings.max_image_bytes} byte limit", "image_too_large",
                           "messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "image data URL is not valid base64", "invalid_base64", "messages") from None
        return _image(data)
    path = url.removeprefix("file://")
    root = settings.local_image_root
    if root is None:
        raise APIError(400, "local image paths are refused (start the server with --allow-local-images DIR)",
                       "local_path_refused", "messages")
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([full, os.path.realpath(root)]) != os.path.realpath(root):
        raise APIError(400, f"image path {path!r} is outside the allowed folder", "local_path_refused", "messages")
    if os.path.isfile(full) and os.path.getsize(full) > settings.max_image_bytes:
        raise APIError(413, f"image is over the {settings.max_image_bytes} byte limit", "image_too_large", "messages")
    return _image(full)


def fetch(url: str, limit: int) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            data = response.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise APIError(400, f"could not fetch image {url}: {err}", "image_fetch_failed", "messages") from None
    if len(data) > limit:
        raise APIError(413, f"image is over the {limit} byte limit", "image_too_large", "messages")
    return data


def _image(ref):
    try:
        return open_image(ref)
    except RequestError as err:
        raise APIError(400, str(err), "invalid_image", "messages") from None


def to_generation_request(body: ChatCompletionRequest, settings: ServerSettings) -> GenerationRequest:
    messages, images = [], []
    for message in body.messages:
        parts = ([ContentPart(type="text", text=message.content)] if isinstance(message.content, str)
                 else message.content or [])
        text = ""
        for part in parts:
            if part.type == "text":
                text += part.text or ""
            else:
                if part.image_url is None:
                    raise APIError(400, "an image_url part needs an image_url object", "invalid_image_url")
                images.append(load_image_url(part.image_url.url, settings))
                text += IMAGE_MARKER
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": text})
    if len(images) > settings.max_images:
        raise APIError(400, f"{len(images)} images in one request; this server allows {settings.max_images}",
                       "too_many_images", "messages")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    try:
        params = SamplingParams(max_new_tokens=body.max_completion_tokens or body.max_tokens or
                                settings.default_max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, repetition_penalty=body.repetition_penalty, stop=stop,
                                seed=body.seed)
    except ValueError as err:
        raise APIError(400, str(err), "invalid_sampling_parameters") from None
    return GenerationRequest(messages=messages, images=images, params=params)


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="minimind-v", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return error_body(err.status, err.message, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_request"
        return error_body(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", code, where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        return error_body(err.status_code, str(err.detail), "not_found" if err.status_code == 404 else "http_error")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
                return error_body(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": settings.model_name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "minimind-v"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest):
        if body.model != settings.model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves "
                                f"{settings.model_name!r}", "model_not_found", "model")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "unsupported_n", "n")
        request = to_generation_request(body, settings)
        try:
            engine.encode(request)  # image counts and context length, checked before any response starts
        except RequestError as err:
            raise APIError(400, str(err), "invalid_prompt", "messages") from None
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(sse_chunks(engine, request, meta, usage), media_type="text/event-stream")
        result = engine.generate([request])[0]
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": usage_of(result)}

    return app


def usage_of(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def sse_chunks(engine: Engine, request: GenerationRequest, meta: dict, include_usage: bool):
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for delta in engine.stream([request]):
        if delta.text:
            yield chunk({"content": delta.text})
        if delta.result is not None:
            yield chunk({}, delta.result.finish_reason)
            if include_usage:
                body = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(delta.result)}
                yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
