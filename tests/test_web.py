"""The Gradio web demo in headless Chromium (Playwright driving the system `chromium`): upload an image, ask,
see the answer stream in; a screenshot is saved. The model is first taught one answer, so there is something
definite to look for."""

import shutil
import threading
import time

import pytest
import torch
from PIL import Image

gradio = pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")

from helpers import tiny_config  # noqa: E402
from minimind_v import MiniMindVLM  # noqa: E402
from minimind_v.data.processing import tokenize_conversation  # noqa: E402
from minimind_v.generation import Engine, EngineWorker, GenerationRequest, SamplingParams  # noqa: E402
from minimind_v.serving.web import build_app, empty_history, respond  # noqa: E402
from test_server import free_port  # noqa: E402

ANSWER = "a blue square"
QUESTION = "what is this?"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def taught(clip_dir, tokenizer, tmp_path_factory):
    """A tiny model trained for a few seconds to answer ANSWER about a blue picture."""
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(vocab_size=len(tokenizer)), vision_model_path=clip_dir)
    picture = Image.new("RGB", (48, 48), (30, 60, 220))
    messages = [{"role": "user", "content": "<image>" + QUESTION}, {"role": "assistant", "content": ANSWER}]
    ids, labels = tokenize_conversation(tokenizer, [{**m, "content": m["content"].replace(
        "<image>", model.config.image_special_token)} for m in messages])
    pixels = model.image2tensor(picture, model.processor)[None]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), pixel_values=pixels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("web") / "blue.png"
    picture.save(path)
    engine = Engine(model.eval(), tokenizer)
    answer = engine.generate([GenerationRequest(messages=[messages[0]], images=[picture],
                                                params=SamplingParams(max_new_tokens=20))])[0].text
    assert answer == ANSWER, "the taught model should give its one answer"
    return engine, path


def test_respond_streams_and_keeps_history(taught):
    engine, path = taught
    settings = (0.0, 1.0, 0, 20, 1.0)
    worker = EngineWorker(engine)
    updates = list(respond(worker, QUESTION, Image.open(path), empty_history(), *settings))
    display, history, textbox, image = updates[-1]
    assert display[-1] == {"role": "assistant", "content": ANSWER} and textbox == "" and image is None
    assert len(updates) >= 3  # streamed: several partial answers before the last
    assert history["messages"][0]["content"] == "<image>" + QUESTION and len(history["images"]) == 1
    bad = list(respond(worker, "two?", Image.open(path), history, 0.0, 1.0, 0, 0, 1.0))[-1]
    assert bad[0][-1]["content"].startswith("[error: max_new_tokens must be at least 1")
    worker.stop(timeout=5)


def answer_in_a_thread(worker: EngineWorker, path, timeout: float) -> list:
    """A whole second turn from another session, as another browser would ask it: [last update] or [] if it
    did not finish within `timeout` s."""
    done = []
    thread = threading.Thread(target=lambda: done.append(list(respond(
        worker, QUESTION, Image.open(path), empty_history(), 0.0, 1.0, 0, 20, 1.0))[-1]), daemon=True)
    thread.start()
    thread.join(timeout)
    return done


def test_an_abandoned_answer_does_not_hold_the_engine(taught):
    """A browser that leaves mid-answer: Gradio may never resume (or close) that turn's generator. Another
    session's turn is still answered; closing the abandoned turn cancels its answer at the next step."""
    engine, path = taught
    worker = EngineWorker(engine)
    try:
        left = respond(worker, QUESTION, Image.open(path), empty_history(), 0.0, 1.0, 0, 20, 1.0)
        next(left)  # the first partial answer shown, then nobody reads on
        done = answer_in_a_thread(worker, path, timeout=30)
        assert done and done[0][0][-1] == {"role": "assistant", "content": ANSWER}
        steps, real, eos = [], engine._advance, engine.eos_ids
        engine._advance = lambda *args: (steps.append(1), time.sleep(0.005), real(*args))[2]
        engine.eos_ids = set()  # the abandoned answer would run its 400 tokens
        try:
            long = respond(worker, "and more?", None, empty_history(), 0.0, 1.0, 0, 400, 1.0)
            next(long)
            long.close()  # Gradio closes the turn of a browser that left
            start = time.time()
            assert answer_in_a_thread(worker, path, timeout=30)
            assert time.time() - start < 2.0 and len(steps) < 200  # not behind 400 steps of the abandoned answer
        finally:
            del engine._advance
            engine.eos_ids = eos
    finally:
        worker.stop(timeout=5)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's)")
def test_web_demo_in_headless_chromium(taught, tmp_path):
    engine, path = taught
    app = build_app(engine)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            page.locator("#image input[type=file]").set_input_files(str(path))
            page.locator("#image img").first.wait_for(timeout=30_000)
            page.locator("#message textarea").fill(QUESTION)
            page.locator("#send").click()
            page.get_by_text(ANSWER).first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "web-demo.png"), full_page=True)
            assert "[image] " + QUESTION in page.locator("#chat").inner_text()
            browser.close()
    finally:
        app.close()
    assert (tmp_path / "web-demo.png").stat().st_size > 10_000
