"""The real `minimind-v serve` process: SIGTERM drains in-flight requests for --drain-timeout, cancels the rest and
exits (an abandoned stream cannot keep it alive); `minimind-v bench serve` loads it and reports."""

import http.client
import json
import signal
import threading
import time

import pytest

pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

from minimind_v.cli import main  # noqa: E402
from minimind_v.bench.serve import start_server  # noqa: E402

DRAIN = 2.0


class Stream(threading.Thread):
    """A streamed chat request read to its end: `events` (data lines), `first` set at the first text."""

    def __init__(self, port: int, max_tokens: int, prompt: str = "tell me a long story"):
        super().__init__(daemon=True)
        self.port, self.events, self.first = port, [], threading.Event()
        self.body = json.dumps({"model": "tiny", "max_tokens": max_tokens, "stream": True, "temperature": 0,
                                "messages": [{"role": "user", "content": prompt}]})
        self.start()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request("POST", "/v1/chat/completions", self.body, {"Content-Type": "application/json"})
            for line in connection.getresponse():
                if line.startswith(b"data: "):
                    self.events.append(line[6:].strip().decode())
                    if '"content": "' in self.events[-1] and '"content": ""' not in self.events[-1]:
                        self.first.set()
        except (OSError, http.client.HTTPException):
            pass  # cut by the server's shutdown

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"


def waiting(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("GET", "/ready")
    return json.loads(connection.getresponse().read())["waiting"]


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_sigterm_drains_then_exits(model_dir):
    process, url = start_server(str(model_dir), "tiny", ["--drain-timeout", str(DRAIN), "--max-batch", "1"], wait=120)
    port = int(url.rsplit(":", 1)[1])
    try:
        abandoned = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # the old deadlock: a stream left
        abandoned.request("POST", "/v1/chat/completions", json.dumps({
            "model": "tiny", "max_tokens": 400, "stream": True, "messages": [{"role": "user", "content": "x"}]}),
            {"Content-Type": "application/json"})
        abandoned.getresponse().readline()
        abandoned.close()
        first = Stream(port, 450)
        first.first.wait(30)
        short = Stream(port, 30, "a short one")  # in flight at SIGTERM, queued behind `first`
        wait_for(lambda: waiting(port) >= 1)
        long = [Stream(port, 450, f"story number {i}") for i in range(60)]  # far more work than the drain time
        wait_for(lambda: waiting(port) >= 20)
        process.send_signal(signal.SIGTERM)
        signalled = time.time()
        process.wait(timeout=DRAIN + 30)
        exited = time.time() - signalled
    finally:
        process.kill()
    assert exited < DRAIN + 3.0, f"exited {exited:.1f} s after SIGTERM"
    assert process.returncode in (0, -signal.SIGTERM)
    short.join(5)
    assert short.done and json.loads(short.events[-2])["choices"][0]["finish_reason"] == "length"
    assert sum(s.done for s in long) < len(long)  # the rest were cancelled at the drain deadline


def test_bench_serve_reports_load_latency_and_memory(model_dir, capsys):
    image = str(model_dir.parent / "blue.png")
    assert main(["bench", "serve", str(model_dir), "--clients", "3", "--seconds", "2", "--max-tokens", "4",
                 "--image", image, "--stream", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"]["ok"] > 3 and report["requests"]["failed"] == 0
    assert report["requests"]["by_status"] == {"200": report["requests"]["ok"]}
    assert report["completion_tokens"] == 4 * report["requests"]["ok"] and report["tokens_per_s"] > 0
    latency = report["latency_s"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    assert 0 < report["first_token_s"]["p50"] <= latency["p99"]
    assert report["health_s"]["count"] >= 5 and report["health_s"]["failed"] == 0
    assert 0 < report["health_s"]["median"] <= report["health_s"]["max"] < 1.0
    rss = report["rss_mib"]
    assert 50 < rss["before"] <= rss["peak"] and rss["after"] > 50
    assert report["images_per_request"] == 1 and report["request_body_bytes"][0] > 100
    assert report["load_seconds"] == 2 and report["seconds"] >= 2


def test_bench_serve_table(model_dir, capsys):
    from minimind_v.bench.serve import table

    report = {"clients": 2, "load_seconds": 1, "seconds": 1.2, "stream": False, "max_tokens": 4, "temperature": 0.0,
              "ignore_eos": True,
              "images_per_request": 0, "request_body_bytes": [120],
              "requests": {"ok": 5, "failed": 1, "by_status": {"200": 5, "503": 1}},
              "completion_tokens": 20, "tokens_per_s": 20.0, "requests_per_s": 5.0,
              "latency_s": {"p50": 0.1, "p90": 0.2, "p99": 0.3}, "first_token_s": None,
              "health_s": {"count": 10, "failed": 0, "median": 0.002, "max": 0.01},
              "rss_mib": {"before": 300.0, "peak": 320.5, "after": 301.0}}
    text = table(report)
    assert "| requests ok / failed" in text and "5 / 1" in text and "200: 5, 503: 1" in text
    assert "300.0 MiB / 320.5 MiB / 301.0 MiB" in text and "0.002 s / 0.01 s" in text
    assert text.startswith("bench serve: 2 clients sending for 1 s (1.2 s to the last answer), max_tokens 4 (EOS "
                           "ignored), temperature 0, not streamed")


def test_the_server_leaves_a_core_to_its_http_side(model_dir, capsys):
    import torch

    from minimind_v.device import serving_threads

    cpu = torch.device("cpu")
    assert [serving_threads(cpu, cores=n) for n in (1, 2, 16)] == [1, 1, 15]
    assert serving_threads(cpu, requested=3, cores=2) == 3 and serving_threads(torch.device("cuda")) is None
    with pytest.raises(ValueError, match="at least 1"):
        serving_threads(cpu, requested=0)
    for command in ("serve", "web"):  # the web demo takes the same setting
        assert main([command, str(model_dir), "--threads", "0"]) != 0  # refused before the model loads
        assert "--threads must be at least 1" in capsys.readouterr().err
