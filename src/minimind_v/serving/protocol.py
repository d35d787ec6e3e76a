"""The server's settings, the OpenAI chat-completion request it accepts, and its error bodies.

Every error is `{"error": {"message", "type", "param", "code"}}` with an HTTP status (the README lists each code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..data.images import DEFAULT_LIMITS, ImageLimits

MiB = 2**20


@dataclass
class ServerSettings:
    model_name: str = "minimind-v"
    api_key: str | None = None
    local_image_root: str | None = None  # local file paths are read only from under this folder, when set
    fetch_remote_images: bool = False  # http(s) image URLs are refused unless this is set
    max_images: int = 4
    max_image_bytes: int = 10 * MiB
    default_max_tokens: int = 256
    max_queue: int = 128  # requests waiting for a slot; one more gets 429 server_busy
    max_batch: int = 64  # requests decoding together (continuous batching: each in a slot of the KV pool)
    max_len: int | None = 2048  # prompt + answer tokens per request, at most (None: the model's context)
    request_timeout: float | None = 600.0  # seconds from queueing to the last token (None: none)
    max_body_bytes: int | None = None  # None: room for max_images base64 images of max_image_bytes, + 1 MiB
    decode_threads: int = 2  # image decoding threads: at most this many full-size decoded images exist at once
    image_limits: ImageLimits = field(default_factory=lambda: DEFAULT_LIMITS)

    @property
    def body_limit(self) -> int:
        """The largest request body read, in bytes."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return self.max_images * self.max_image_bytes * 4 // 3 + MiB


class APIError(Exception):
    """An error answered as an OpenAI error body with `status` (and any extra response headers)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_json(status: int, message: str, code: str, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_body(status: int, message: str, code: str, param: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_json(status, message, code, param), status, headers=headers)


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
    """The fields of OpenAI's chat completion request that this server reads (others are ignored). Sampling values
    are range-checked by SamplingParams (400 invalid_sampling_parameters)."""
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
    ignore_eos: bool = False  # vLLM's extension: decode to the token limit whatever the model says (benchmarks)

    def max_new_tokens(self, default: int) -> tuple[int, str]:
        """(the token limit asked for, the field it came from); 0 is a value, not a missing one."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        if self.max_tokens is not None:
            return self.max_tokens, "max_tokens"
        return default, "max_tokens"
