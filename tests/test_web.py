"""The Gradio web demo in headless Chromium (Playwright driving the system `chromium`): attach an image, ask,
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
from minimind_v.serving.web import EMPTY_BOX, build_app, empty_history, respond  # noqa: E402
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


def box(text: str, *paths) -> dict:
    """The multimodal message box's value."""
    return {"text": text, "files": [str(p) for p in paths]}


SETTINGS = (0.0, 1.0, 0, 20, 1.0)


def test_respond_streams_and_keeps_history(taught):
    engine, path = taught
    worker = EngineWorker(engine)
    updates = list(respond(worker, box(QUESTION, path), empty_history(), *SETTINGS))
    display, history, box_value = updates[-1]
    assert display[-1] == {"role": "assistant", "content": ANSWER} and box_value == EMPTY_BOX
    assert display[-2] == {"role": "user", "content": [{"path": str(path)}, QUESTION]}  # the image, as a thumbnail
    assert len(updates) >= 3  # streamed: several partial answers before the last
    assert history["messages"][0]["content"] == "<image>" + QUESTION and len(history["images"]) == 1
    bad = list(respond(worker, box("two?", path), history, 0.0, 1.0, 0, 0, 1.0))[-1]
    assert bad[0][-1]["content"].startswith("[error: max_new_tokens must be at least 1") and bad[2] == box("two?", path)
    assert bad[1] is history  # a failed turn leaves the history as it was
    missing = list(respond(worker, box("this?", "/no/such.png"), history, *SETTINGS))[-1]
    assert "missing image" in missing[0][-1]["content"]
    worker.stop(timeout=5)


def test_an_empty_message_is_not_sent_and_a_stopped_answer_stays(taught):
    engine, path = taught
    worker = EngineWorker(engine)
    try:
        history = list(respond(worker, box(QUESTION, path), empty_history(), *SETTINGS))[-1][1]
        assert list(respond(worker, box("   "), history, *SETTINGS)) == [(history["display"], history, EMPTY_BOX)]
        eos, engine.eos_ids = engine.eos_ids, set()  # an answer that would run its 200 tokens
        try:
            turn = respond(worker, box("and more?"), history, 0.0, 1.0, 0, 200, 1.0)
            updates = [next(turn) for _ in range(3)]
            turn.close()  # the stop button (or a browser that left)
        finally:
            engine.eos_ids = eos
        display, kept, _ = updates[-1]
        assert kept["messages"][-2] == {"role": "user", "content": "and more?"}
        assert kept["messages"][-1]["content"] == display[-1]["content"] != ""  # the partial answer is kept
        assert len(kept["messages"]) == 4 and len(kept["images"]) == 1
    finally:
        worker.stop(timeout=5)


def answer_in_a_thread(worker: EngineWorker, path, timeout: float) -> list:
    """A whole second turn from another session, as another browser would ask it: [last update] or [] if it
    did not finish within `timeout` s."""
    done = []
    thread = threading.Thread(target=lambda: done.append(list(respond(
        worker, box(QUESTION, path), empty_history(), *SETTINGS))[-1]), daemon=True)
    thread.start()
    thread.join(timeout)
    return done


def test_an_abandoned_answer_does_not_hold_the_engine(taught):
    """A browser that leaves mid-answer: Gradio may never resume (or close) that turn's generator. Another
    session's turn is still answered; closing the abandoned turn cancels its answer at the next step."""
    engine, path = taught
    worker = EngineWorker(engine)
    try:
        left = respond(worker, box(QUESTION, path), empty_history(), *SETTINGS)
        next(left)  # the first partial answer shown, then nobody reads on
        done = answer_in_a_thread(worker, path, timeout=30)
        assert done and done[0][0][-1] == {"role": "assistant", "content": ANSWER}
        steps, real, eos = [], engine._advance, engine.eos_ids
        engine._advance = lambda *args: (steps.append(1), time.sleep(0.005), real(*args))[2]
        engine.eos_ids = set()  # the abandoned answer would run its 400 tokens
        try:
            long = respond(worker, box("and more?"), empty_history(), 0.0, 1.0, 0, 400, 1.0)
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
    """The page names the model; an image attached in the message box shows as a thumbnail in the conversation and
    the answer streams in; an empty message is not sent; the trash icon clears the conversation for good (the next
    answer does not bring old turns back)."""
    engine, path = taught
    app = build_app(engine, model="taught-model (tiny)")
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            page.get_by_text("taught-model (tiny)").first.wait_for(timeout=30_000)
            page.locator("#message input[type=file]").set_input_files(str(path))
            page.locator("#message textarea").fill(QUESTION)
            page.locator("#message textarea").press("Enter")
            page.locator("#chat").get_by_text(ANSWER).first.wait_for(timeout=60_000)
            page.locator("#chat img").first.wait_for(timeout=30_000)  # the image, in the conversation
            page.screenshot(path=str(tmp_path / "web-demo.png"), full_page=True)
            chat = page.locator("#chat").inner_text()
            page.locator("#message textarea").press("Enter")  # nothing written: nothing sent
            time.sleep(1.0)
            assert page.locator("#chat").inner_text() == chat
            page.locator("#chat").get_by_label("Clear").first.click()
            page.locator("#message textarea").fill("and now?")
            page.locator("#message textarea").press("Enter")
            page.locator("#chat").get_by_text("and now?").first.wait_for(timeout=60_000)
            shown, deadline = None, time.time() + 60
            while time.time() < deadline and shown != page.locator("#chat").inner_text():  # the answer is done
                shown = page.locator("#chat").inner_text()
                time.sleep(1.0)
            assert "and now?" in shown and QUESTION not in shown  # the cleared turn did not come back
            browser.close()
    finally:
        app.close()
    assert (tmp_path / "web-demo.png").stat().st_size > 10_000
