"""What the engine takes and gives: requests, results, stream deltas, and the prompt encoder that turns a request
into checked token ids (chat template, `<image>` markers against images, context length).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..config import IMAGE_MARKER
from ..data.processing import chat_prompt, check_placeholders, expand_image_markers
from .sampling import SamplingParams


class RequestError(ValueError):
    """A request the engine cannot serve (wrong image count, prompt too long, ...): the caller's mistake."""


@dataclass
class GenerationRequest:
    """`messages` (role/content dicts, run through the chat template) or a raw `text` prompt; `<image>` marks
    where each of `images` goes, in order: PIL images, or the tower's pixel values [3, H, W] from
    `Engine.pixel_values` (all of one kind within a batch). Setting `cancel` ends the request at the next step."""
    messages: list[dict] | None = None
    text: str | None = None
    images: list[Image.Image | torch.Tensor] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    image_keys: list[str] = field(default_factory=list)  # content keys, when the engine has a feature cache
    cancel: threading.Event | None = None
    prompt_ids: list[int] | None = None  # set by the first encode: a request is tokenized once


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled" (text: what was released)
    prompt_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (which prefill produced) per second of decoding."""
        return max(self.completion_tokens - 1, 0) / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass
class StreamDelta:
    index: int  # which request
    text: str  # new text since this request's previous delta
    result: GenerationResult | None = None  # set on the request's last delta


class PromptEncoder:
    """Requests -> prompt token ids for one model and tokenizer, checked: markers against images, the context."""

    def __init__(self, tokenizer, config, takes_images: bool):
        self.tokenizer, self.config, self.takes_images = tokenizer, config, takes_images
        self.context = config.max_position_embeddings
        # No token covers more characters than the longest vocabulary entry (for byte-level BPE its length is its
        # byte count), and Unicode normalization composes at most 4 characters into 1: a prompt text longer than
        # this cannot fit the context, whatever its tokens, and is refused before tokenizing.
        self.max_prompt_chars = 4 * self.context * max(map(len, tokenizer.get_vocab()))

    def check_prompt_size(self, request: GenerationRequest) -> None:
        """RequestError when the prompt's text is too long to fit the context whatever its tokens (cheap: counts
        characters, before the slow tokenization of a huge text)."""
        chars = len(request.text or "") + sum(len(str(m.get("content") or "")) for m in request.messages or [])
        if chars > self.max_prompt_chars:
            raise RequestError(f"the prompt is {chars} characters; no prompt over {self.max_prompt_chars} characters "
                               f"fits this model's context of {self.context} tokens")

    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids, after checking images against `<image>` markers and the context length; kept on the
        request (`prompt_ids`), so a request is tokenized once."""
        if request.prompt_ids is not None:
            return request.prompt_ids
        if (request.messages is None) == (request.text is None):
            raise RequestError("give either chat messages or a raw text prompt")
        self.check_prompt_size(request)
        config = self.config
        if request.messages is not None:
            markers = sum(str(m.get("content", "")).count(IMAGE_MARKER) for m in request.messages)
            text = chat_prompt(self.tokenizer, config, request.messages)
        else:
            markers, text = request.text.count(IMAGE_MARKER), expand_image_markers(request.text, config)
        if markers != len(request.images):
            raise RequestError(f"the prompt has {markers} <image> marker(s) but {len(request.images)} image(s) "
                               "were given")
        if request.images and not self.takes_images:
            raise RequestError("this model has no vision tower, so it cannot take images")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        try:
            check_placeholders(ids, markers, config)
        except ValueError as err:  # e.g. a literal placeholder typed into a message, or a foreign tokenizer
            raise RequestError(str(err)) from None
        if len(ids) >= self.context:
            raise RequestError(f"the prompt is {len(ids)} tokens; this model's context is {self.context} tokens")
        request.prompt_ids = ids
        return ids
