"""`minimind-v serve`: an OpenAI-compatible HTTP API (FastAPI) over the generation engine.

    GET  /health                 liveness (answered on the event loop at once, even while generation runs)
    GET  /ready                  200 when the model is loaded and the engine's worker takes requests, else 503
    GET  /metrics                Prometheus metrics (metrics.py)
    GET  /v1/models              the one model served
    POST /v1/chat/completions    OpenAI chat format: text and image_url content parts, stream (server-sent events),
                                 temperature, top_p, max_tokens / max_completion_tokens, stop, seed
                                 (+ top_k and repetition_penalty, as vLLM accepts them)

A request's path: body (size-bounded, asgi.py; large ones read a few at a time) -> JSON parsed and images decoded
to pixel values in a small thread pool (image_input.py) -> prompt checked -> one engine worker thread (worker.py:
continuous batching; a bounded queue, full: 429 server_busy with Retry-After; a request past the time-out: 504), or
that worker in an engine process of its own (engine_process.py).
A client that disconnects cancels its request at the next decode step, streaming or not. A stream sends whatever
text is ready in one event, so a client that reads slowly gets fewer, larger events. Every error is an
OpenAI-style body {"error": {"message", "type", "param", "code"}}; an error in the middle of a stream ends it with
`data: {"error": ...}` and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..config import IMAGE_MARKER
from ..generation import (Engine, EngineWorker, GenerationRequest, Job, RequestError, SamplingError, SamplingParams,
                          ServerBusy, WorkerStopped)
from .asgi import CancellableStream, RequestGuard, RequestTooLarge
from .image_input import ImageDecoder
from .metrics import AccessLog, ServerMetrics
from .protocol import APIError, ChatCompletionRequest, ContentPart, ServerSettings, error_body, error_json

logger = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there
LARGE_BODY = 2**20  # bodies over this many bytes are read a few at a time (ImageDecoder.slots)


def create_app(engine: Engine, settings: ServerSettings, worker=None) -> FastAPI:
    """The app, with its engine worker (app.state.worker: an EngineWorker thread on `engine` unless `worker`, e.g.
    an EngineProcess, is given) and image decoder; both stop at the app's shutdown."""
    worker = worker or EngineWorker(engine, settings.max_queue, settings.max_batch, settings.max_len,
                                    settings.request_timeout, warm_up=True)
    decoder = ImageDecoder(engine, settings)
    metrics = ServerMetrics(worker)

    @asynccontextmanager
    async def lifespan(_):
        # The model, torch and transformers leave millions of long-lived objects; frozen, the garbage collector
        # stops walking them, and its full collections no longer stall requests (on a 2-core CPU under 64 clients:
        # /health at worst 24 ms instead of 226 ms, first-text p99 152 ms instead of 365 ms).
        gc.collect()
        gc.freeze()
        yield
        worker.stop(timeout=30)  # in-flight jobs are cancelled: this waits one decode step at most
        decoder.close()

    app = FastAPI(title="minimind-v", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker = worker
    app.state.metrics = metrics
    app.add_middleware(RequestGuard, api_key=settings.api_key, limit=settings.body_limit)
    app.add_middleware(AccessLog, metrics=metrics)  # outermost: refused requests are logged and counted too
    add_error_handlers(app)
    add_info_routes(app, settings, worker, metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, engine, settings, worker, decoder, metrics)

    return app


def add_info_routes(app: FastAPI, settings: ServerSettings, worker: EngineWorker, metrics: ServerMetrics) -> None:
    """/health, /ready, /metrics and /v1/models: answered on the event loop, never behind generation."""
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name}

    @app.get("/ready")
    async def ready():
        if not worker.ready:
            message = "the decode steps are being prepared" if worker.alive else "the engine worker is not running"
            return error_body(503, message, "not_ready")
        return {"status": "ready", "model": settings.model_name, "waiting": worker.waiting,
                "running": worker.running}

    @app.get("/metrics")
    async def prometheus():
        body, kind = metrics.render()
        return Response(body, media_type=kind)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "minimind-v"}]}


async def complete(request: Request, engine: Engine, settings: ServerSettings, worker: EngineWorker,
                   decoder: ImageDecoder, metrics: ServerMetrics):
    """POST /v1/chat/completions: a stream of events, or the whole answer once it is done; a client that leaves
    cancels its request."""
    generation_request, stream, usage = await prepare(request, engine, settings, decoder)
    if await request.is_disconnected():  # gone while its images were decoded: nothing to queue
        raise APIError(400, "the client disconnected", "client_disconnected")
    job = submit(worker, generation_request)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
    access = request.scope.get("state", {}).get("access", {})
    record = Recorder(metrics, access)
    if stream:
        return CancellableStream(sse_events(job, meta, usage, record), job.cancel, media_type="text/event-stream")
    try:
        result = await finished_or_gone(job, request)
    finally:
        job.cancel()  # the client left, the server is stopping, or (a no-op) the job is done
    if result is not None:
        record.first_text()
        record.finished(result)
    if result is not None and result.finish_reason == "timeout":
        raise APIError(504, f"the request ran past this server's {settings.request_timeout:g} s time-out",
                       "request_timeout")
    if result is None or result.finish_reason == "cancelled":
        raise APIError(503, "the request was cancelled before it finished", "cancelled")
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason}],
            "usage": usage_of(result)}


async def prepare(request: Request, engine: Engine, settings: ServerSettings,
                  decoder: ImageDecoder) -> tuple[GenerationRequest, bool, bool]:
    """(the checked generation request, stream?, include usage?). A large body (over LARGE_BODY bytes, or of no
    stated length) waits for one of the decoder's few slots before it is read - the client's upload waits in its
    socket meanwhile - and its JSON (base64 images included) is dropped once the images are pixel values."""
    length = request.headers.get("content-length", "")
    large = not length.isdigit() or int(length) > LARGE_BODY
    async with decoder.slots if large else contextlib.nullcontext():
        body = await read_body(request, decoder)
        if body.model != settings.model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves "
                                f"{settings.model_name!r}", "model_not_found", "model")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "unsupported_n", "n")
        usage = bool((body.stream_options or {}).get("include_usage"))
        return await to_generation_request(body, settings, engine, decoder), body.stream, usage


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return error_body(err.status, err.message, err.code, err.param, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_body(err.status_code, str(err.detail), code)

    @app.exception_handler(Exception)
    async def unexpected(_, err: Exception):  # the server logs the traceback (Starlette re-raises to uvicorn)
        return error_body(500, f"internal error: {type(err).__name__}", "internal_error")


async def read_body(request: Request, decoder: ImageDecoder) -> ChatCompletionRequest:
    """The request body (within the size limit), parsed and validated off the event loop."""
    chunks = []
    try:
        async for chunk in request.stream():
            chunks.append(chunk)
    except RequestTooLarge as err:
        raise APIError(413, f"the request body is over this server's {err} byte limit", "request_too_large") from None
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the request", "client_disconnected") from None
    raw = b"".join(chunks)
    del chunks
    try:
        return await decoder.run(ChatCompletionRequest.model_validate_json, raw)
    except ValidationError as err:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_request"
        raise APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", code, where or None) from None


def sampling_params(body: ChatCompletionRequest, settings: ServerSettings) -> SamplingParams:
    """The request's sampling settings; 400 invalid_sampling_parameters naming the field when one is out of range."""
    max_new, max_field = body.max_new_tokens(settings.default_max_tokens)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    try:
        return SamplingParams(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, repetition_penalty=body.repetition_penalty, stop=stop, seed=body.seed,
                              ignore_eos=body.ignore_eos)
    except SamplingError as err:
        param = max_field if err.field == "max_new_tokens" else err.field
        raise APIError(400, str(err).replace("max_new_tokens", param), "invalid_sampling_parameters", param) from None


async def to_generation_request(body: ChatCompletionRequest, settings: ServerSettings, engine: Engine,
                                decoder: ImageDecoder) -> GenerationRequest:
    """Messages with `<image>` markers, sampling and pixel values of the images, checked cheapest first: image
    count, sampling values and prompt length before any image is decoded, tokens last."""
    messages, urls = [], []
    for message in body.messages:
        parts = ([ContentPart(type="text", text=message.content)] if isinstance(message.content, str)
                 else message.content or [])
        text = ""
        for part in parts:
            if part.type == "text":
                text += part.text or ""
            elif part.image_url is None:
                raise APIError(400, "an image_url part needs an image_url object", "invalid_image_url", "messages")
            else:
                urls.append(part.image_url.url)
                text += IMAGE_MARKER
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": text})
    if len(urls) > settings.max_images:
        raise APIError(400, f"{len(urls)} images in one request; this server allows {settings.max_images}",
                       "too_many_images", "messages")
    request = GenerationRequest(messages=messages, params=sampling_params(body, settings))
    try:
        engine.check_prompt_size(request)
        request.images = [await decoder.pixels(url) for url in urls]
        await decoder.run(engine.encode, request)  # image counts and context length, before any response starts
    except RequestError as err:
        raise APIError(400, str(err), "invalid_prompt", "messages") from None
    return request


class Recorder:
    """One request's figures for the metrics and its access-log line."""

    def __init__(self, metrics: ServerMetrics, access: dict):
        self.metrics, self.access, self.first = metrics, access, None

    def first_text(self) -> None:
        if self.first is None and "start" in self.access:
            self.first = time.perf_counter() - self.access["start"]
            self.metrics.first_token.observe(self.first)
            self.access["ttft"] = f"{self.first * 1000:.1f}ms"

    def finished(self, result) -> None:
        self.metrics.finished(result.prompt_tokens, result.completion_tokens)
        self.access.update(prompt=result.prompt_tokens, completion=result.completion_tokens,
                           finish=result.finish_reason)


def submit(worker: EngineWorker, request: GenerationRequest) -> Job:
    try:
        return worker.submit(request, asyncio.get_running_loop())
    except ServerBusy as err:
        raise APIError(429, f"the server is busy: {err}", "server_busy", headers={"Retry-After": "1"}) from None
    except RequestError as err:
        raise APIError(400, str(err), "invalid_prompt", "messages") from None
    except WorkerStopped as err:
        raise APIError(503, str(err), "shutting_down") from None


async def finished_or_gone(job: Job, request: Request):
    """The job's result; None as soon as the client has disconnected (checked every DISCONNECT_POLL_S)."""
    task = asyncio.ensure_future(job.aresult())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                return None
        return task.result()  # raises the engine's error, if any (-> 500 internal_error)
    finally:
        task.cancel()


def usage_of(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def sse_events(job: Job, meta: dict, include_usage: bool, record: Recorder):
    """The job as chat.completion.chunk events: a role chunk, content deltas (all the text that is ready in one
    event), the finish chunk (+ usage), [DONE]. An engine error, a time-out, or the job cancelled under a client that
    is still there (server shutdown), ends the stream with an error event before [DONE]."""
    def chunk(delta: dict, finish: str | None = None) -> str:
        return _event({**meta, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    finished = False
    try:
        async for deltas in job.chunks():
            text, result = "".join(d.text for d in deltas), deltas[-1].result
            record.first_text()
            events = [chunk({"content": text})] if text else []
            if result is not None:
                record.finished(result)
            if result is not None and result.finish_reason == "timeout":
                finished = True
                events.append(_event(error_json(504, "the request ran past this server's time-out",
                                                "request_timeout")))
            elif result is not None and result.finish_reason != "cancelled":
                finished = True
                events.append(chunk({}, result.finish_reason))
                if include_usage:
                    events.append(_event({**meta, "object": "chat.completion.chunk", "choices": [],
                                          "usage": usage_of(result)}))
            if events:
                yield "".join(events)
    except Exception as err:  # the worker has logged it with its traceback
        yield _event(error_json(500, f"generation failed: {type(err).__name__}: {str(err)[:200]}", "internal_error"))
        finished = True
    if not finished:
        yield _event(error_json(503, "the request was cancelled before it finished", "cancelled"))
    yield "data: [DONE]\n\n"
