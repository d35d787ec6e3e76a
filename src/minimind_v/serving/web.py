"""`minimind-v web`: a small Gradio app over the engine — a multimodal message box (text and images; the images show
as thumbnails in the conversation), streaming answers with a stop button, sampling settings, the loaded model named
at the top. Each browser session keeps its own history (messages with `<image>` markers, images in order); every
update of a turn carries the history so far, so a stopped answer stays in it, and the trash icon clears both the
display and the history. Answers run on one engine worker thread (generation/worker.py), so a browser that leaves
mid-answer cannot hold the engine: its answer is cancelled when Gradio closes the turn, and is only a finite job on
the worker if it never does."""

from __future__ import annotations

from ..config import IMAGE_MARKER
from ..generation import (Engine, EngineWorker, GenerationRequest, RequestError, SamplingParams, ServerBusy,
                          WorkerStopped)
from .chat import EMPTY, open_image

EMPTY_BOX = {"text": "", "files": []}


def empty_history() -> dict:
    return {"messages": [], "images": [], "display": []}


def image_paths(box: dict | None) -> list[str]:
    """The image files of a multimodal box's value (paths, or file dicts with a path)."""
    return [f if isinstance(f, str) else f["path"] for f in (box or {}).get("files") or []]


def respond(worker: EngineWorker, box: dict | None, history: dict, temperature: float, top_p: float, top_k: float,
            max_new_tokens: float, repetition_penalty: float):
    """One turn from the message box ({"text", "files"}), streamed: yields (chat display, history, box value).
    An empty message is not sent. Closing the generator before the end cancels the answer; the history of the last
    update holds what was answered until then."""
    text, paths = ((box or {}).get("text") or "").strip(), image_paths(box)
    if not text and not paths:
        yield history["display"], history, EMPTY_BOX
        return
    shown = [{"path": path} for path in paths] + ([text] if text else [])
    display = history["display"] + [{"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
    job, answer = None, ""
    try:
        pending = [open_image(path) for path in paths]
        message = {"role": "user", "content": IMAGE_MARKER * len(pending) + text}
        params = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=temperature, top_k=int(top_k),
                                top_p=top_p, repetition_penalty=repetition_penalty)
        request = GenerationRequest(messages=history["messages"] + [message], images=history["images"] + pending,
                                    params=params)
        worker.engine.encode(request)  # image count and length: a clear error before queueing
        job = worker.submit(request)
        for delta in job:
            answer += delta.text
            yield (*_update(display, history, message, pending, answer), EMPTY_BOX)
    except (ValueError, RequestError, ServerBusy, WorkerStopped) as err:  # bad images or settings, a full queue
        display[-1] = {"role": "assistant", "content": f"[error: {err}]"}
        yield display, history, box
        return
    finally:
        if job is not None:
            job.cancel()  # a no-op after the last delta; else (stopped, or the browser left) the engine stops
    yield (*_update(display, history, message, pending, answer or EMPTY, answer), EMPTY_BOX)


def _update(display: list, history: dict, message: dict, pending: list, shown: str, answer: str | None = None):
    """(display, history) with the answer so far; `answer` (default: `shown`) is what the history keeps."""
    display = display[:-1] + [{"role": "assistant", "content": shown}]
    kept = shown if answer is None else answer
    return display, {"messages": history["messages"] + [message, {"role": "assistant", "content": kept}],
                     "images": history["images"] + pending, "display": display}


def build_app(engine: Engine, title: str = "minimind-v", model: str = ""):
    """The Gradio Blocks app; its answers run on a worker thread of its own over `engine`. `model`: what is loaded,
    as the page shows it."""
    import gradio as gr

    worker = EngineWorker(engine, max_batch=8)  # a few browsers at once; KV memory for 8 answers
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\n" + (f"model: `{model}`\n\n" if model else "") +
                    "Write a message, attach images with the clip (they go with that message), and watch the answer "
                    "stream; the square stops it, the trash icon starts a new conversation.")
        history = gr.State(empty_history())
        chat = gr.Chatbot(label="conversation", elem_id="chat", height=420)
        box = gr.MultimodalTextbox(placeholder="what color is the shape?", file_types=["image"], file_count="multiple",
                                   elem_id="message", show_label=False, submit_btn=True, stop_btn=True)
        with gr.Accordion("sampling", open=False):
            settings = [gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)"),
                        gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p"),
                        gr.Slider(0, 200, value=0, step=1, label="top_k (0: off)"),
                        gr.Slider(1, 1024, value=128, step=1, label="max new tokens"),
                        gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="repetition penalty")]

        def turn(box_value, state, *sampling):
            yield from respond(worker, box_value, state, *sampling)

        sent = box.submit(turn, [box, history, *settings], [chat, history, box])
        box.stop(None, None, None, cancels=[sent])
        chat.clear(empty_history, None, history)
    return app
