"""One request's row of a decoding batch: its tokens, the text released so far (decoded a short window at a time,
never a partial character), and where it stops (EOS, a stop string, its own limit)."""

from __future__ import annotations

from typing import Callable

from .sampling import SamplingParams


def text_decoder(tokenizer) -> Callable[..., str]:
    """The tokenizer's decode (ids, skip_special_tokens=...) -> text, taken from its Rust backend when that gives
    the same text (no clean-up of spaces after it): a third of the time per call, and a row decodes at every token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer.decode
    return backend.decode


class Row:
    """One request's decoding state: tokens, the text released so far, stop handling."""

    def __init__(self, decode: Callable[..., str], eos_ids: set[int], prompt_ids: list[int], params: SamplingParams,
                 max_new: int):
        """`decode`: the tokenizer's decode; `eos_ids`: the tokens that end the answer (none with ignore_eos)."""
        self.decode, self.eos_ids = decode, set() if params.ignore_eos else eos_ids
        self.prompt_ids, self.params, self.max_new = prompt_ids, params, max_new
        self.tokens: list[int] = []
        self.text, self.released, self.finish = "", 0, None
        self.prefix = self.read = 0  # the text of tokens[:read] is in self.text; tokens[prefix:read] give context
        self.pad = 0  # left-padding columns before this row's prompt in the batch

    def push(self, token: int) -> str:
        """Take one generated token; return the newly releasable text."""
        if token in self.eos_ids:
            self.finish = "stop"
            self._detokenize(final=True)
            return self._release(len(self.text))
        self.tokens.append(token)
        self._detokenize(final=len(self.tokens) >= self.max_new)
        hits = [i for i in (self.text.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            self.text, self.finish = self.text[:min(hits)], "stop"
            return self._release(len(self.text))
        if len(self.tokens) >= self.max_new:
            self.finish = "length"
            return self._release(len(self.text))
        return self._release(self._safe_end())

    def end(self, reason: str) -> None:
        """Stop before the limit (cancelled, timed out): the text is what was released so far."""
        self.finish, self.text = reason, self.text[:self.released]

    def _detokenize(self, final: bool) -> None:
        """Extend the text by the new tokens, decoding only a short window (not the whole answer every step); a
        partial multi-byte character waits for its remaining bytes unless this is the end."""
        decode = self.decode
        before = decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if final or not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.tokens)

    def _safe_end(self) -> int:
        """Hold back a partial multi-byte character and any tail that could begin a stop string."""
        end = len(self.text.rstrip("\ufffd"))
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if self.text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return max(end, self.released)

    def _release(self, end: int) -> str:
        delta, self.released = self.text[self.released:end], max(self.released, end)
        return delta
