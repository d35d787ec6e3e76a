"""`minimind-v chat`: a terminal chat with streaming output, images, multi-turn history; or one scripted turn."""

from __future__ import annotations

import os
import sys
from typing import Callable, TextIO

from PIL import Image

from ..data.images import DEFAULT_LIMITS, ImageLimits, load_image
from ..data.skips import SkipRecord
from ..config import IMAGE_MARKER
from ..generation import Engine, GenerationRequest, GenerationResult, RequestError, SamplingParams

HELP = ("commands: /image PATH  attach an image to your next message (repeatable)\n"
        "          /reset       forget the conversation\n"
        "          /stats       show or hide decode speed after each answer\n"
        "          /quit        leave (or Ctrl-D); Ctrl-C stops an answer; arrow keys recall earlier lines")


def open_image(ref: str | bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """A path or encoded bytes -> RGB image; a clear RequestError for a missing, corrupt or oversized one."""
    try:
        return load_image(ref, limits)[0]
    except SkipRecord as err:
        where = f" {ref}" if isinstance(ref, str) else ""
        raise RequestError(f"image{where}: {err}") from None


class ChatSession:
    """Conversation history (messages with `<image>` markers, images in order) over an engine."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        self.engine, self.params, self.system = engine, params, system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list[Image.Image] = []
        self.pending: list[Image.Image] = []

    def attach(self, path: str) -> None:
        self.pending.append(open_image(path))

    def send(self, text: str, on_delta: Callable[[str], None]) -> GenerationResult:
        """One user turn (with the attached images) -> the streamed answer; history grows only on success."""
        message = {"role": "user", "content": IMAGE_MARKER * len(self.pending) + text}
        request = GenerationRequest(messages=self.messages + [message], images=self.images + self.pending,
                                    params=self.params)
        result, text, stream = None, "", self.engine.stream([request])
        try:
            for delta in stream:
                on_delta(delta.text)
                text += delta.text
                result = delta.result or result
        except KeyboardInterrupt:  # Ctrl-C: the answer stops here; what was shown stays in the conversation
            stream.close()
            result = GenerationResult(text, [], "cancelled", len(request.prompt_ids or []))
        self.messages += [message, {"role": "assistant", "content": result.text}]
        self.images += self.pending
        self.pending = []
        return result


EMPTY = "[no answer: the model ended it at once - try another wording, or a model trained on such questions]"
HISTORY = os.path.join(os.path.expanduser("~"), ".minimind_v_history")


def line_editing(history: str = HISTORY, length: int = 1000) -> None:
    """Arrow keys, editing and a history kept across sessions for `input()` (GNU readline, where Python has it)."""
    try:
        import atexit
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input
        return
    try:
        readline.read_history_file(history)
    except OSError:  # no history yet (or unreadable): start empty
        pass
    readline.set_history_length(length)
    atexit.register(_save_history, readline, history)


def _save_history(readline, history: str) -> None:
    try:
        readline.write_history_file(history)
    except OSError:
        pass


def answer_note(result: GenerationResult) -> str:
    """What to say after an answer: that it was stopped, or that it was empty."""
    if result.finish_reason == "cancelled":
        return "\n[stopped]"
    return EMPTY if not result.text.strip() else ""


def speed_line(result: GenerationResult) -> str:
    return (f"[{result.completion_tokens} tokens, prefill {result.prefill_seconds * 1000:.0f} ms, "
            f"decode {result.decode_tokens_per_s:.1f} tokens/s, finish: {result.finish_reason}]")


def run_chat(session: ChatSession, prompt: str | None = None, images: list[str] = (), stats: bool = False,
             read: Callable[[str], str] = input, out: TextIO | None = None) -> int:
    """Scripted (`prompt` given: one turn, then exit) or interactive until /quit or end of input; the answers go to
    `out` (default: sys.stdout as it is at the call, so a redirection of it is followed)."""
    out = out if out is not None else sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    for path in images:
        session.attach(path)
    if prompt is not None:
        result = session.send(prompt, write)
        write(answer_note(result) + "\n" + (speed_line(result) + "\n" if stats else ""))
        return 0
    if read is input:
        line_editing()
    write("minimind-v chat: type a message, /help for commands, /quit to leave\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:  # as in a shell: a fresh prompt
            write("\n[Ctrl-D or /quit to leave]\n")
            continue
        stats = _turn(session, line, stats, write)
        if stats is None:
            return 0


def _turn(session: ChatSession, line: str, stats: bool, write: Callable[[str], None]) -> bool | None:
    """Handle one input line; returns the new /stats setting, or None to quit."""
    command, _, argument = line.partition(" ")
    try:
        if command in ("/quit", "/exit"):
            return None
        if command == "/help" or not line:
            write(HELP + "\n")
        elif command == "/image":
            session.attach(argument.strip())
            write(f"[image attached: {argument.strip()}; {len(session.pending)} waiting for your next message]\n")
        elif command == "/reset":
            session.reset()
            write("[conversation cleared]\n")
        elif command == "/stats":
            stats = not stats
            write(f"[speed after each answer: {'on' if stats else 'off'}]\n")
        else:
            write("assistant> ")
            result = session.send(line, write)
            write(answer_note(result) + "\n" + (speed_line(result) + "\n" if stats else ""))
    except RequestError as err:
        write(f"[error: {err}]\n")
    return stats
