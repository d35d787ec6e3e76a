"""`minimind-v bench serve`: a load test of the API server.

    start `minimind-v serve MODEL` on a free loopback port (or use --url [--pid])
    -> `clients` threads, each sending chat completions back to back for `seconds` (optionally with images,
       optionally streamed), over a kept-alive connection
    -> meanwhile: GET /health every 0.1 s (its latency under load) and the server's RSS every 0.2 s (psutil)
    -> requests by status, completion tokens/s, latency percentiles, /health latency, RSS before / peak / after

Only the standard library and psutil, so it runs wherever the server's client side does.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

MiB = 2**20


@dataclass
class Load:
    clients: int = 64
    seconds: float = 60.0
    max_tokens: int = 32
    stream: bool = False
    images: list[str] = field(default_factory=list)  # image files, cycled through the requests
    images_per_request: int = 1
    model: str = "bench"
    api_key: str | None = None
    prompt: str = "describe the picture in a few words"
    ignore_eos: bool = False  # every answer runs to max_tokens (vLLM's extension; the server accepts it)
    temperature: float = 0.0


def data_url(path: str) -> str:
    kind = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{kind};base64," + base64.b64encode(f.read()).decode()


def request_bodies(load: Load) -> list[bytes]:
    """The JSON bodies the clients send, built once and shared (an image body can be tens of MB)."""
    urls = [data_url(p) for p in load.images]
    bodies = []
    for first in range(max(len(urls), 1)):
        content = [{"type": "image_url", "image_url": {"url": urls[(first + k) % len(urls)]}}
                   for k in range(load.images_per_request if urls else 0)]
        body = {"model": load.model, "max_tokens": load.max_tokens, "temperature": load.temperature,
                "stream": load.stream,
                "messages": [{"role": "user", "content": content + [{"type": "text", "text": load.prompt}]}]}
        if load.ignore_eos:
            body["ignore_eos"] = True
        if load.stream:
            body["stream_options"] = {"include_usage": True}
        bodies.append(json.dumps(body).encode())
    return bodies


def _read_answer(response: http.client.HTTPResponse, stream: bool, sent: float) -> tuple[int, float | None]:
    """(completion tokens, seconds to the first text or None) of a 200 answer; ValueError for an error event."""
    if not stream:
        return json.loads(response.read())["usage"]["completion_tokens"], None
    tokens, first = 0, None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise ValueError(event["error"].get("code", "stream error"))
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - sent
    return tokens, first


def one_request(connection: http.client.HTTPConnection, body: bytes, load: Load) -> dict:
    """Send one chat completion; its outcome: status (a number, or the error's name), latency, tokens."""
    headers = {"Content-Type": "application/json"}
    if load.api_key:
        headers["Authorization"] = f"Bearer {load.api_key}"
    sent = time.perf_counter()
    try:
        connection.request("POST", "/v1/chat/completions", body, headers)
        response = connection.getresponse()
        if response.status != 200:
            response.read()
            return {"status": str(response.status)}
        tokens, first = _read_answer(response, load.stream, sent)
    except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
        connection.close()
        return {"status": f"error: {err}" if isinstance(err, ValueError) else f"error: {type(err).__name__}"}
    return {"status": "200", "latency": time.perf_counter() - sent, "tokens": tokens, "first": first}


def _client(address: tuple[str, int], bodies: list[bytes], load: Load, index: int, deadline: float,
            out: list) -> None:
    connection = http.client.HTTPConnection(*address, timeout=300)
    n = index
    while time.perf_counter() < deadline:
        out.append(one_request(connection, bodies[n % len(bodies)], load))
        n += 1
    connection.close()


def _health(address: tuple[str, int], stop: threading.Event, out: list) -> None:
    """/health latency, each on a fresh connection (as a load balancer's probe); inf when it failed."""
    while not stop.is_set():
        start = time.perf_counter()
        try:
            connection = http.client.HTTPConnection(*address, timeout=10)
            connection.request("GET", "/health")
            ok = connection.getresponse().status == 200
            connection.close()
        except (OSError, http.client.HTTPException):
            ok = False
        out.append(time.perf_counter() - start if ok else float("inf"))
        stop.wait(0.1)


class RssSampler(threading.Thread):
    """The server's resident memory (its process and theirs it started: an engine process) every `interval` s:
    `peak` in bytes."""

    def __init__(self, pid: int | None, interval: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.process, self.interval = (psutil.Process(pid) if pid else None), interval
        self.peak, self.halt = self.now() or 0, threading.Event()

    def now(self) -> int | None:
        import psutil

        if self.process is None:
            return None
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # ended meanwhile
                pass
        return total

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.peak = max(self.peak, self.now() or 0)


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile (q in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def run_load(url: str, load: Load, pid: int | None = None, settle: float = 2.0) -> dict:
    """Drive the server at `url` with `load`; the report (see the module docstring). `settle`: seconds to wait
    after the load before the last RSS sample."""
    parts = urllib.parse.urlsplit(url)
    address = (parts.hostname, parts.port or 80)
    bodies, results, health = request_bodies(load), [], []
    sampler, stop = RssSampler(pid), threading.Event()
    before = sampler.now()
    sampler.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=_client, args=(address, bodies, load, i, start + load.seconds, results),
                                daemon=True) for i in range(load.clients)]
    threads.append(threading.Thread(target=_health, args=(address, stop, health), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads[:-1]:
        thread.join()
    elapsed = time.perf_counter() - start
    stop.set()
    threads[-1].join()
    time.sleep(settle)
    sampler.halt.set()
    return report(load, results, health, elapsed, (before, sampler.peak, sampler.now()), [len(b) for b in bodies])


def report(load: Load, results: list[dict], health: list[float], elapsed: float, rss: tuple,
           body_bytes: list[int]) -> dict:
    """The figures of one load run (`elapsed`: from the first request to the last answer)."""
    ok = [r for r in results if r["status"] == "200"]
    latencies, firsts = [r["latency"] for r in ok], [r["first"] for r in ok if r.get("first") is not None]
    tokens = sum(r["tokens"] for r in ok)
    mib = [round(x / MiB, 1) if x is not None else None for x in rss]
    answered = [h for h in health if h != float("inf")]
    return {
        "clients": load.clients, "load_seconds": load.seconds, "seconds": round(elapsed, 2), "stream": load.stream,
        "max_tokens": load.max_tokens, "images_per_request": len(load.images) and load.images_per_request,
        "temperature": load.temperature, "ignore_eos": load.ignore_eos,
        "request_body_bytes": body_bytes,
        "requests": {"ok": len(ok), "failed": len(results) - len(ok),
                     "by_status": dict(Counter(r["status"] for r in results).most_common())},
        "completion_tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1),
        "requests_per_s": round(len(ok) / elapsed, 2),
        "latency_s": {f"p{q}": _round(percentile(latencies, q / 100)) for q in (50, 90, 99)},
        "first_token_s": ({f"p{q}": _round(percentile(firsts, q / 100)) for q in (50, 90, 99)} if load.stream
                          else None),
        "health_s": {"count": len(health), "failed": len(health) - len(answered),
                     "median": _round(percentile(answered, 0.5)), "max": _round(max(answered, default=None))},
        "rss_mib": dict(zip(("before", "peak", "after"), mib)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def table(report: dict) -> str:
    """The report as a Markdown table under a line naming the load."""
    r = report
    rows = [("requests ok / failed", f"{r['requests']['ok']} / {r['requests']['failed']}"),
            ("by status", ", ".join(f"{k}: {v}" for k, v in r["requests"]["by_status"].items())),
            ("completion tokens/s", r["tokens_per_s"]), ("requests/s", r["requests_per_s"]),
            ("latency p50 / p90 / p99", " / ".join(f"{v} s" for v in r["latency_s"].values()))]
    if r["first_token_s"]:
        rows.append(("first token p50 / p90 / p99", " / ".join(f"{v} s" for v in r["first_token_s"].values())))
    health = r["health_s"]
    rows += [("/health median / max during the load", f"{health['median']} s / {health['max']} s "
                                                        f"({health['count']} probes, {health['failed']} failed)"),
             ("server RSS before / peak / after", " / ".join(f"{v} MiB" for v in r["rss_mib"].values()))]
    width = max(len(name) for name, _ in rows)
    sizes = sorted(set(r["request_body_bytes"]))
    title = (f"bench serve: {r['clients']} clients sending for {r['load_seconds']:g} s ({r['seconds']} s to the last "
             f"answer), max_tokens {r['max_tokens']}{' (EOS ignored)' if r['ignore_eos'] else ''}, "
             f"temperature {r['temperature']:g}, {'streamed' if r['stream'] else 'not streamed'}, "
             f"{r['images_per_request']} image(s) per request, bodies of {' / '.join(f'{n:,}' for n in sizes)} bytes")
    lines = [title, "", f"| {'figure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    return "\n".join(lines + [f"| {name:<{width}} | {value} |" for name, value in rows])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, name: str, extra: list[str], wait: float = 600) -> tuple[subprocess.Popen, str]:
    """`minimind-v serve MODEL` on a free loopback port, once /ready answers (the decode steps are prepared):
    (process, base URL)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "minimind_v.cli", "serve", model, "--port", str(port),
                                "--model-name", name, "--no-access-log", *extra])
    url, deadline = f"http://127.0.0.1:{port}", time.time() + wait
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ready")
            if connection.getresponse().status == 200:
                return process, url
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise ValueError(f"the server did not start (exit status {process.poll()})")
        time.sleep(0.3)


def cmd_bench_serve(args) -> int:
    """`minimind-v bench serve`: start the server (or use --url), load it, print the table or --json."""
    if not args.url and not args.model:
        raise ValueError("give a MODEL to serve, or the --url of a running server")
    load = Load(clients=args.clients, seconds=args.seconds, max_tokens=args.max_tokens, stream=args.stream,
                images=args.image, images_per_request=args.images_per_request, model=args.model_name,
                api_key=args.api_key or os.environ.get("MINIMIND_V_API_KEY"), ignore_eos=args.ignore_eos,
                temperature=args.temperature, prompt=args.prompt)
    process = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        process, url = start_server(args.model, args.model_name, args.server_arg)
        pid = process.pid
    try:
        result = run_load(url, load, pid)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


def add_load_parser(bench) -> argparse.ArgumentParser:
    """`minimind-v bench serve` and its options (the model the CLI adds, as every command's), on the `bench`
    subparsers -> its parser."""
    parser = bench.add_parser("serve", help="concurrent clients against `minimind-v serve`: requests by status, "
                                            "tokens/s, latency, /health latency, server RSS")
    parser.add_argument("--url", help="a running server instead (its RSS only with --pid)")
    parser.add_argument("--pid", type=int, help="the running server's process id, for its RSS")
    parser.add_argument("--clients", type=int, default=64,
                        help="concurrent clients, each sending one request after another")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load lasts")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--stream", action="store_true", help="streamed answers (also measures the first token)")
    parser.add_argument("--prompt", default=Load.prompt, help="the user message's text")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="ask for answers of exactly --max-tokens tokens (the server's ignore_eos extension)")
    parser.add_argument("--image", action="append", default=[], metavar="PNG",
                        help="an image file sent as a data URL (repeatable: requests cycle through them)")
    parser.add_argument("--images-per-request", type=int, default=1, help="images attached to each request")
    parser.add_argument("--model-name", default="bench", help="the id the server is started with and asked for")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (or MINIMIND_V_API_KEY)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="an argument for the started `minimind-v serve` (repeatable), e.g. --server-arg=--compile")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a table")
    parser.set_defaults(func=cmd_bench_serve)
    return parser
