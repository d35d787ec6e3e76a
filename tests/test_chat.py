"""`minimind-v chat` through a pseudo-terminal, the scripted mode, the session's history, and `bench`."""

import io
import json
import os
import subprocess
import signal
import sys

import pytest
import torch
from PIL import Image

from minimind_v.cli import main
from minimind_v.generation import Engine, GenerationRequest, RequestError, SamplingParams
from minimind_v.serving.chat import ChatSession

pexpect = pytest.importorskip("pexpect")


def engine_for(model_dir) -> Engine:
    from minimind_v.build import load_for_inference

    return Engine(*load_for_inference(str(model_dir), device="cpu"))


def test_interactive_chat_in_a_pseudo_terminal(model_dir):
    # Ctrl-C as at a terminal, however the tests were started (a background job inherits SIGINT ignored)
    child = pexpect.spawn(sys.executable, ["-m", "minimind_v.cli", "chat", str(model_dir), "--max-new-tokens", "6"],
                          encoding="utf-8", timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect("you> ")
        child.sendline(f"/image {model_dir.parent / 'blue.png'}")
        child.expect(r"\[image attached: .*blue.png; 1 waiting")
        child.expect("you> ")
        child.sendline("what is this?")
        child.expect("assistant> ")
        child.expect("you> ")
        child.sendline("/stats")
        child.expect(r"speed after each answer: on")
        child.sendline("and now?")
        child.expect(r"\[6 tokens, prefill \d+ ms, decode [\d.]+ tokens/s, finish: length\]|finish: stop\]")
        child.sendline("/image /no/such/file.png")
        child.expect(r"\[error: image /no/such/file.png: missing image")
        child.expect("you> ")
        child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, the session goes on
        child.expect(r"\[Ctrl-D or /quit to leave\]")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("flags", [[], ["--compile"]])
def test_scripted_chat_prints_the_engines_answer(model_dir, flags):
    """`--compile` (on a CPU: the compiled fixed-shape step) gives the same answer as the plain engine."""
    image = str(model_dir.parent / "blue.png")
    done = subprocess.run([sys.executable, "-m", "minimind_v.cli", "chat", str(model_dir), "--image", image,
                           "--prompt", "describe it", "--max-new-tokens", "8", *flags], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    engine = engine_for(model_dir)
    from minimind_v.serving.chat import EMPTY, open_image

    expected = engine.generate([GenerationRequest(messages=[{"role": "user", "content": "<image>describe it"}],
                                                  images=[open_image(image)],
                                                  params=SamplingParams(max_new_tokens=8))])[0]
    blank = not expected.text.strip()  # this random model writes only line breaks: said so after them
    assert done.stdout == expected.text + (EMPTY if blank else "") + "\n"


def test_ctrl_c_stops_the_answer_and_the_conversation_goes_on(model_dir, monkeypatch):
    engine = engine_for(model_dir)
    session = ChatSession(engine, SamplingParams(max_new_tokens=30))
    real, shown = engine.stream, []

    def interrupted(requests):  # Ctrl-C arrives after the third piece of text
        for k, delta in enumerate(real(requests)):
            if k == 3:
                raise KeyboardInterrupt
            yield delta

    monkeypatch.setattr(engine, "stream", interrupted)
    result = session.send("tell me", shown.append)
    assert result.finish_reason == "cancelled" and result.text == "".join(shown)
    assert session.messages[-1] == {"role": "assistant", "content": result.text}
    monkeypatch.setattr(engine, "stream", real)
    assert engine.lock.acquire(timeout=1)  # the engine was released
    engine.lock.release()
    assert session.send("and then?", lambda text: None).finish_reason in ("stop", "length")


def test_history_carries_earlier_turns_and_images(model_dir):
    engine = engine_for(model_dir)
    session = ChatSession(engine, SamplingParams(max_new_tokens=5), system="be brief")
    session.attach(str(model_dir.parent / "blue.png"))
    first = session.send("what is it?", lambda _: None)
    streamed = []
    second = session.send("again", streamed.append)
    assert "".join(streamed) == second.text
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == "<image>what is it?" and len(session.images) == 1
    replay = engine.generate([GenerationRequest(messages=session.messages[:2] + [
        {"role": "assistant", "content": first.text}, {"role": "user", "content": "again"}],
        images=session.images, params=SamplingParams(max_new_tokens=5))])[0]
    assert replay.text == second.text and replay.prompt_tokens > first.prompt_tokens
    with pytest.raises(RequestError, match="missing image"):
        session.attach("/no/such.png")
    session.reset()
    assert session.messages == [{"role": "system", "content": "be brief"}] and not session.images


def test_bench_reports_prefill_decode_and_memory(model_dir, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["bench", "decode", str(model_dir), "--device", "cpu", "--prompt-tokens", "40", "--new-tokens", "8",
                 "--batch", "3", "--runs", "1", "--profile", str(trace), "--compare-generate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompt_tokens"] >= 40 and report["images"] == 1
    for size in ("batch_1", "batch_3"):
        assert report[size]["prefill_ms"] > 0 and report[size]["decode_tokens_per_s"] > 0
        assert report[size]["transformers_generate_end_to_end_tokens_per_s"] > 0
        assert report[size]["engine_end_to_end_tokens_per_s"] > 0
    assert "MiB" in report["peak_memory"]
    assert json.loads(trace.read_text())["traceEvents"]
    from minimind_v.bench.decode import table_rows

    rows = dict(table_rows(report)[1])  # what the table shows of the comparison
    generate = report["batch_3"]["transformers_generate_end_to_end_tokens_per_s"]
    assert rows["batch 3: transformers generate, end to end tokens/s"] == f"{generate:,}"


def test_the_guides_benchmark_and_profile_functions(model_dir, tmp_path):
    from minimind_v.bench.decode import benchmark_model_performance, profile_model_execution

    model = engine_for(model_dir).model
    inputs = {"input_ids": torch.randint(0, 200, (1, 24))}
    stats = benchmark_model_performance(model, inputs, num_runs=3, warmup=1)
    assert 0 < stats["latency_min"] <= stats["latency_mean"] <= stats["latency_max"]
    table = profile_model_execution(model, inputs, str(tmp_path / "t.json"))
    assert "Self CPU" in table and (tmp_path / "t.json").stat().st_size > 0


def test_chat_errors_are_clear(model_dir, capsys):
    assert main(["chat", str(model_dir), "--temperature", "-1", "--prompt", "x"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
    assert main(["chat", str(model_dir) + "-missing", "--prompt", "x"]) == 2
    assert "model not found" in capsys.readouterr().err


def test_serve_and_web_name_their_extra_when_it_is_missing(model_dir, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("fastapi", "gradio")
                        else real(name, *a))
    assert main(["serve", str(model_dir)]) == 2
    assert "pip install 'minimind-v[serve]'" in capsys.readouterr().err
    assert main(["web", str(model_dir)]) == 2
    assert "pip install 'minimind-v[web]'" in capsys.readouterr().err


def test_serve_command_binds_loopback_and_answers(model_dir):
    import time
    import urllib.request

    from test_server import free_port, http

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "minimind_v.cli", "serve", str(model_dir), "--port", str(port),
                               "--model-name", "tiny"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                status, body = http(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stderr.read()
                time.sleep(0.5)
        assert status == 200 and body == {"status": "ok", "model": "tiny"}
        import psutil

        bound = {c.laddr.ip for c in psutil.Process(server.pid).net_connections() if c.status == "LISTEN"}
        assert bound == {"127.0.0.1"}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                         data=json.dumps({"model": "tiny", "max_tokens": 3, "messages": [
                                             {"role": "user", "content": "hi"}]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] <= 3
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_chat_loads_an_original_pth_like_its_folder(model_dir, clip_dir, tmp_path, tokenizer):
    from minimind_v.build import load_for_inference
    from minimind_v.interop.original import save_original

    folder_engine = engine_for(model_dir)
    pth = tmp_path / "sft_vlm_64.pth"
    save_original(folder_engine.model, pth, dtype=torch.float32)
    with pytest.raises(ValueError, match="pass --tokenizer"):
        load_for_inference(str(pth))
    placeholders = dict(image_special_token="@" * 16, image_ids=[34] * 16)  # not recorded in a .pth
    pth_engine = Engine(*load_for_inference(str(pth), tokenizer=str(model_dir), vision=clip_dir, device="cpu",
                                            **placeholders))
    image = Image.open(model_dir.parent / "blue.png").convert("RGB")
    request = GenerationRequest(messages=[{"role": "user", "content": "<image>hi"}], images=[image],
                                params=SamplingParams(max_new_tokens=6))
    assert pth_engine.generate([request])[0].token_ids == folder_engine.generate([request])[0].token_ids


def test_chat_recalls_earlier_lines_with_the_arrow_keys_and_keeps_them(model_dir, tmp_path):
    """readline: the up arrow brings back the last line (here /stats, turning it off again); the history is kept
    in ~/.minimind_v_history for the next session."""
    env = {**os.environ, "HOME": str(tmp_path)}
    child = pexpect.spawn(sys.executable, ["-m", "minimind_v.cli", "chat", str(model_dir), "--max-new-tokens", "4"],
                          encoding="utf-8", timeout=120, env=env)
    try:
        child.expect("you> ")
        child.sendline("/stats")
        child.expect(r"speed after each answer: on")
        child.expect("you> ")
        child.send("\x1b[A\r")  # up arrow, enter
        child.expect(r"speed after each answer: off")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    kept = (tmp_path / ".minimind_v_history").read_text().splitlines()
    assert kept[-1] == "/quit" and "/stats" in kept


def test_an_empty_answer_is_said_not_left_blank():
    from minimind_v.generation import GenerationResult
    from minimind_v.serving.chat import EMPTY, run_chat

    class Silent:  # a session whose model ends every answer at once
        def attach(self, path): pass

        def send(self, text, on_delta):
            return GenerationResult("", [], "stop", 5)

    out = io.StringIO()
    assert run_chat(Silent(), prompt="describe the image.", out=out) == 0
    assert EMPTY in out.getvalue()
    lines = iter(["describe the image.", "/quit"])
    out = io.StringIO()
    assert run_chat(Silent(), read=lambda prompt: next(lines), out=out) == 0
    assert f"assistant> {EMPTY}" in out.getvalue()
    import contextlib

    redirected = io.StringIO()  # no `out`: sys.stdout as it is at the call, not at import
    with contextlib.redirect_stdout(redirected):
        assert run_chat(Silent(), prompt="describe the image.") == 0
    assert EMPTY in redirected.getvalue()
