"""`minimind-v web`: a small Gradio app over the engine — upload an image, chat with streaming answers, tune
sampling. Each browser session keeps its own history (messages with `<image>` markers, images in order). Answers
run on one engine worker thread (generation/worker.py), so a browser that leaves mid-answer cannot hold the engine:
its answer is cancelled when Gradio closes the turn, and is only a finite job on the worker if it never does."""

from __future__ import annotations

from ..config import IMAGE_MARKER
from ..generation import Engine, EngineWorker, GenerationRequest, SamplingParams, ServerBusy, WorkerStopped


def empty_history() -> dict:
    return {"messages": [], "images": [], "display": []}


def respond(worker: EngineWorker, text: str, image, history: dict, temperature: float, top_p: float,
            top_k: float, max_new_tokens: float, repetition_penalty: float):
    """One turn, streamed: yields (chat display, history, textbox value, image value). Closing the generator
    before the end cancels the answer."""
    pending = [image.convert("RGB")] if image is not None else []
    message = {"role": "user", "content": IMAGE_MARKER * len(pending) + text}
    display = history["display"] + [{"role": "user", "content": ("[image] " if pending else "") + text},
                                     {"role": "assistant", "content": ""}]
    job = None
    try:
        params = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=temperature, top_k=int(top_k),
                                top_p=top_p, repetition_penalty=repetition_penalty)
        request = GenerationRequest(messages=history["messages"] + [message], images=history["images"] + pending,
                                    params=params)
        worker.engine.encode(request)  # image count and length: a clear error before queueing
        job, answer = worker.submit(request), ""
        for delta in job:
            answer += delta.text
            display[-1] = {"role": "assistant", "content": answer}
            yield display, history, "", None
    except (ValueError, ServerBusy, WorkerStopped) as err:  # RequestError, bad sampling settings, a full queue
        display[-1] = {"role": "assistant", "content": f"[error: {err}]"}
        yield display, history, text, image
        return
    finally:
        if job is not None:
            job.cancel()  # a no-op after the last delta; else (the browser left) the engine stops at the next step
    history = {"messages": history["messages"] + [message, {"role": "assistant", "content": answer}],
               "images": history["images"] + pending, "display": display}
    yield display, history, "", None


def build_app(engine: Engine, title: str = "minimind-v"):
    """The Gradio Blocks app; its answers run on a worker thread of its own over `engine`."""
    import gradio as gr

    worker = EngineWorker(engine, max_batch=8)  # a few browsers at once; KV memory for 8 answers
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\nUpload an image (it goes with your next message), ask, and watch the answer stream.")
        history = gr.State(empty_history())
        chat = gr.Chatbot(label="conversation", elem_id="chat", height=360)
        with gr.Row():
            image = gr.Image(type="pil", label="image for the next message", elem_id="image", height=220)
            with gr.Column():
                text = gr.Textbox(label="message", placeholder="what color is the shape?", elem_id="message")
                send = gr.Button("send", variant="primary", elem_id="send")
                clear = gr.Button("clear conversation", elem_id="clear")
        with gr.Accordion("sampling", open=False):
            settings = [gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)"),
                        gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p"),
                        gr.Slider(0, 200, value=0, step=1, label="top_k (0: off)"),
                        gr.Slider(1, 1024, value=128, step=1, label="max new tokens"),
                        gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="repetition penalty")]

        def turn(text_value, image_value, state, *sampling):
            yield from respond(worker, text_value, image_value, state, *sampling)

        inputs, outputs = [text, image, history, *settings], [chat, history, text, image]
        send.click(turn, inputs, outputs)
        text.submit(turn, inputs, outputs)
        clear.click(lambda: ([], empty_history(), "", None), None, outputs)
    return app
