"""The server's Prometheus metrics (prometheus-client, one registry per app) and its access log.

    minimind_v_requests_total{status}                  chat completions answered, by HTTP status
    minimind_v_request_duration_seconds                request received -> last byte sent (histogram)
    minimind_v_time_to_first_token_seconds             request received -> first generated text (histogram)
    minimind_v_prompt_tokens_total                     prompt tokens of answered requests
    minimind_v_generation_tokens_total                 tokens generated for answered requests (rate(): tokens/s;
                                                       a request whose client left is not counted)
    minimind_v_generation_tokens_per_second            generated tokens per second over the last 10 s
    minimind_v_queue_length                            requests waiting for a slot
    minimind_v_running_batch_size                      requests in the running decode batch
    minimind_v_batch_slots                             slots of the running batch (its largest size)
    minimind_v_kv_pool_bytes                           the KV memory of those slots (allocated once)

The access log (logger `minimind_v.access`) writes one line per request: client, method, path, status, time, and
for chat completions the prompt and completion tokens and the time to the first token.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

access_log = logging.getLogger("minimind_v.access")
WINDOW_S = 10.0
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class TokenRate:
    """Tokens per second over the last WINDOW_S seconds (thread-safe)."""

    def __init__(self):
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        with self._lock:
            self._events.append((time.monotonic(), tokens))

    def __call__(self) -> float:
        cutoff = time.monotonic() - WINDOW_S
        with self._lock:
            while self._events and self._events[0][0] < cutoff:
                self._events.popleft()
            return sum(n for _, n in self._events) / WINDOW_S


class ServerMetrics:
    """The metrics of one app over its engine worker (`waiting`, `running`, `batch.pool.slots`)."""

    def __init__(self, worker):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("minimind_v_requests", "Chat completion requests by HTTP status", ["status"],
                                registry=r)
        self.duration = Histogram("minimind_v_request_duration_seconds", "Request received to last byte sent",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("minimind_v_time_to_first_token_seconds",
                                     "Request received to its first generated text", buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.prompt_tokens = Counter("minimind_v_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("minimind_v_generation_tokens", "Generated tokens", registry=r)
        self.rate = TokenRate()
        Gauge("minimind_v_generation_tokens_per_second", f"Generated tokens per second over the last {WINDOW_S:g} s",
              registry=r).set_function(self.rate)
        Gauge("minimind_v_queue_length", "Requests waiting for a slot", registry=r).set_function(
            lambda: worker.waiting)
        Gauge("minimind_v_running_batch_size", "Requests in the running decode batch", registry=r).set_function(
            lambda: worker.running)
        Gauge("minimind_v_batch_slots", "Slots of the running batch", registry=r).set(worker.slots)
        Gauge("minimind_v_kv_pool_bytes", "KV memory of the slots", registry=r).set_function(worker.kv_bytes)

    def finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.rate.add(completion_tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class AccessLog:
    """ASGI middleware: times every HTTP request, counts chat completions by status in `metrics`, and logs one line
    per request (with what the route put in scope["state"]["access"]: tokens, time to first token)."""

    def __init__(self, app, metrics: ServerMetrics, path: str = "/v1/chat/completions"):
        self.app, self.metrics, self.path = app, metrics, path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        scope.setdefault("state", {})["access"] = {"start": start}

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self._record(scope, status[0], time.perf_counter() - start)

    def _record(self, scope, status: int, seconds: float) -> None:
        extra = scope["state"]["access"]
        if scope["path"] == self.path:
            self.metrics.requests.labels(str(status)).inc()
            self.metrics.duration.observe(seconds)
        if not access_log.isEnabledFor(logging.INFO):
            return
        client = "%s:%s" % tuple(scope["client"]) if scope.get("client") else "-"
        details = "".join(f" {k}={v}" for k, v in extra.items() if k != "start")
        access_log.info("%s %s %s %d %.1fms%s", client, scope["method"], scope["path"], status, seconds * 1000,
                        details)
