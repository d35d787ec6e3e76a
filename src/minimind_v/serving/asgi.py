"""Two pure-ASGI pieces of the server: the request guard (API key, body size) and a streaming response that stops
when its client leaves."""

from __future__ import annotations

from typing import AsyncIterator, Callable

import anyio
from fastapi.responses import StreamingResponse

from .protocol import error_body


class RequestTooLarge(Exception):
    """A request body grew past the limit while it was read."""


def _header(scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


class RequestGuard:
    """On /v1/ paths, when a key is set, refuses requests without `Authorization: Bearer <key>` (401). Refuses a
    body over `limit` bytes: by its Content-Length before any of it is read (413), and while a body without one is
    read (RequestTooLarge raised from `receive`, answered as 413 by the route that reads it)."""

    def __init__(self, app, api_key: str | None, limit: int):
        self.app, self.api_key, self.limit = app, api_key, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"].startswith("/v1/"):
            if _header(scope, b"authorization") != f"Bearer {self.api_key}".encode():
                response = error_body(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key")
                return await response(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(self.limit)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise RequestTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


def too_large(limit: int):
    return error_body(413, f"the request body is over this server's {limit} byte limit", "request_too_large")


class CancellableStream(StreamingResponse):
    """A streaming response that ends as soon as its client disconnects (whatever the ASGI version the server
    speaks), then closes its iterator and calls `on_close` - also when the stream never started or the server
    cancels it at shutdown."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], media_type: str):
        super().__init__(content, media_type=media_type)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away while we wrote
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.on_close()
            await self.body_iterator.aclose()
