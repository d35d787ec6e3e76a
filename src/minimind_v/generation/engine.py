"""The generation engine behind chat, the API server, the web demo and bench.

    requests (chat messages or raw text with `<image>` markers, PIL images, SamplingParams)
    -> left-padded batch [B, L] + image features [num_images, T, ve]
    -> prefill (images spliced in) into a KV cache preallocated for L + max_new_tokens
    -> decode one token per step for every unfinished row (a replayed CUDA graph for dense MiniMind models on a
       GPU, static_decode.py); each row stops on EOS, a stop string or its own limit
    -> text deltas as they are decoded (`stream`), or whole results (`generate`)

One batch runs at a time (a lock), so concurrent callers queue instead of corrupting each other's cache. The lock is
held while a `stream` generator is open: a consumer that may stop reading must close it, or use a worker
(worker.py: one thread owns the engine). A request's `cancel` event, when set, ends that request at the next step
(finish_reason "cancelled"); a request cancelled before its batch starts costs no prefill.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from PIL import Image

from ..config import IMAGE_MARKER
from ..data.processing import chat_prompt, check_placeholders, expand_image_markers
from ..models.image_features import ImageFeatures
from ..models.vision_tower import image2tensor
from .kv_cache import PreallocatedCache
from .sampling import SamplingParams, TokenChooser
from .static_decode import DecoderPool, static_possible


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


class _Row:
    """One request's decoding state: tokens, the text released so far, stop handling."""

    def __init__(self, engine: "Engine", prompt_ids: list[int], params: SamplingParams, max_new: int):
        self.engine, self.prompt_ids, self.params, self.max_new = engine, prompt_ids, params, max_new
        self.tokens: list[int] = []
        self.text, self.released, self.finish = "", 0, None
        self.prefix = self.read = 0  # the text of tokens[:read] is in self.text; tokens[prefix:read] give context
        self.pad = 0  # left-padding columns before this row's prompt in the batch

    def push(self, token: int) -> str:
        """Take one generated token; return the newly releasable text."""
        if token in self.engine.eos_ids:
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

    def _detokenize(self, final: bool) -> None:
        """Extend the text by the new tokens, decoding only a short window (not the whole answer every step); a
        partial multi-byte character waits for its remaining bytes unless this is the end."""
        decode = self.engine.tokenizer.decode
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


class Engine:
    def __init__(self, model, tokenizer, features: ImageFeatures | None = None, cuda_graphs: bool = True,
                 compile: bool = False):
        """`features`: the tower behind a feature cache (evaluation reuses cached features); by default the
        model's own tower, uncached. `cuda_graphs`: replay decode steps as CUDA graphs where possible;
        `compile`: torch.compile the fixed-shape step (fewer, fused kernels; compiles once per batch shape) - on
        CUDA before capturing it, on a CPU with the weights frozen into it (build a new Engine after changing them)."""
        self.model, self.tokenizer = model.eval(), tokenizer
        on_gpu = model.device.type == "cuda"
        wanted = cuda_graphs if on_gpu else compile  # a CPU gains from static steps only when they are compiled
        self.decoders = DecoderPool(compile=compile) if wanted and static_possible(model) else None
        tower = model.vision_tower
        self.features = features or (ImageFeatures(tower) if tower is not None else None)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.eos_ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_ids.discard(None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.context = model.config.max_position_embeddings
        # No token covers more characters than the longest vocabulary entry (for byte-level BPE its length is its
        # byte count), and Unicode normalization composes at most 4 characters into 1: a prompt text longer than
        # this cannot fit the context, whatever its tokens, and is refused before tokenizing.
        self.max_prompt_chars = 4 * self.context * max(map(len, tokenizer.get_vocab()))
        self.lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def decoding_mode(self) -> str:
        """How decode steps run: 'step by step', 'CUDA graphs', 'compiled CUDA graphs' or 'compiled static steps'."""
        if self.decoders is None:
            return "step by step"
        if self.device.type == "cuda":
            return "compiled CUDA graphs" if self.decoders.compile else "CUDA graphs"
        return "compiled static steps"

    def check_prompt_size(self, request: GenerationRequest) -> None:
        """RequestError when the prompt's text is too long to fit the context whatever its tokens (cheap: counts
        characters, before the slow tokenization of a huge text)."""
        chars = len(request.text or "") + sum(len(str(m.get("content") or "")) for m in request.messages or [])
        if chars > self.max_prompt_chars:
            raise RequestError(f"the prompt is {chars} characters; no prompt over {self.max_prompt_chars} characters "
                               f"fits this model's context of {self.context} tokens")

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> the vision tower's pixel values [3, H, W]: what a request can carry instead of the image
        (a queued request then holds a small tensor, not the decoded picture)."""
        if self.features is None:
            raise RequestError("this model has no vision tower, so it cannot take images")
        return image2tensor(image, self.features.tower.processor)[0]  # [1, 3, H, W] -> [3, H, W]

    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids, after checking images against `<image>` markers and the context length."""
        if (request.messages is None) == (request.text is None):
            raise RequestError("give either chat messages or a raw text prompt")
        self.check_prompt_size(request)
        config = self.model.config
        if request.messages is not None:
            markers = sum(str(m.get("content", "")).count(IMAGE_MARKER) for m in request.messages)
            text = chat_prompt(self.tokenizer, config, request.messages)
        else:
            markers, text = request.text.count(IMAGE_MARKER), expand_image_markers(request.text, config)
        if markers != len(request.images):
            raise RequestError(f"the prompt has {markers} <image> marker(s) but {len(request.images)} image(s) "
                               "were given")
        if request.images and self.features is None:
            raise RequestError("this model has no vision tower, so it cannot take images")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        try:
            check_placeholders(ids, markers, config)
        except ValueError as err:  # e.g. a literal placeholder typed into a message, or a foreign tokenizer
            raise RequestError(str(err)) from None
        if len(ids) >= self.context:
            raise RequestError(f"the prompt is {len(ids)} tokens; this model's context is {self.context} tokens")
        return ids

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        for delta in self.stream(requests):
            if delta.result is not None:
                results[delta.index] = delta.result
        return results

    def stream(self, requests: list[GenerationRequest]) -> Iterator[StreamDelta]:
        """Text deltas for every request as they are decoded; each request's last delta carries its result."""
        rows = []
        for r in requests:
            ids = self.encode(r)
            rows.append(_Row(self, ids, r.params, min(r.params.max_new_tokens, self.context - len(ids))))
        with self.lock:
            yield from self._decode(rows, requests)

    # Inference mode is thread-local and a streaming caller (a web server) may resume this generator on another
    # thread, so each step enters it afresh and no `yield` happens inside it.
    def _decode(self, rows: list[_Row], requests: list[GenerationRequest]) -> Iterator[StreamDelta]:
        start, prefill_done = time.perf_counter(), None
        cancels = [r.cancel for r in requests]
        yield from self._cancelled(rows, cancels, start, start)
        if all(row.finish is not None for row in rows):
            return  # every request was cancelled before its prefill
        with torch.inference_mode():
            state = self._prefill(rows, requests)
            choosers = [TokenChooser(row.params, self.device) for row in rows]
        while True:
            yield from self._cancelled(rows, cancels, start, prefill_done or time.perf_counter())
            if all(row.finish is not None for row in rows):
                return
            with torch.inference_mode():
                tokens = self._choose(rows, choosers, state["history"], state["logits"])  # a list: device done
            prefill_done = prefill_done or time.perf_counter()  # prefill = time to the first token
            for i, (row, token) in enumerate(zip(rows, tokens)):
                if row.finish is None:
                    delta = row.push(token)
                    if row.finish is not None:
                        yield StreamDelta(i, delta, self._result(row, start, prefill_done))
                    elif delta:
                        yield StreamDelta(i, delta)
            if all(row.finish is not None for row in rows):
                return
            with torch.inference_mode():
                self._advance(state, rows, tokens)

    def _cancelled(self, rows: list[_Row], cancels: Iterable[threading.Event | None], start: float,
                   prefill_done: float) -> Iterator[StreamDelta]:
        """Finish every unfinished row whose request is cancelled: its last delta, finish_reason "cancelled" and
        the text released so far."""
        for i, (row, cancel) in enumerate(zip(rows, cancels)):
            if row.finish is None and cancel is not None and cancel.is_set():
                row.finish, row.text = "cancelled", row.text[:row.released]
                yield StreamDelta(i, "", self._result(row, start, prefill_done))

    def prepare(self, requests: list[GenerationRequest], prompts: list[list[int]] | None = None):
        """-> left-padded input_ids [B, L], attention mask [B, L], image features [num_images, T, ve] or None."""
        prompts = prompts or [self.encode(r) for r in requests]
        length = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (length - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        images = [image for r in requests for image in r.images]
        if not images:
            return ids, mask, None
        keys = [key for r in requests for key in (r.image_keys or [""] * len(r.images))]
        return ids, mask, self.features(images, keys, self.device)

    def _prefill(self, rows: list[_Row], requests: list[GenerationRequest]) -> dict:
        """Run the prompts (images spliced in) into a fresh cache; the decoding state."""
        ids, mask, features = self.prepare(requests, [row.prompt_ids for row in rows])  # [B, L], [B, L]
        batch, length = ids.shape
        for row in rows:
            row.pad = length - len(row.prompt_ids)
        total = length + max(row.max_new for row in rows)
        padded = bool((mask == 0).any())
        decoder = self.decoders.get(self.model, batch, total) if self.decoders is not None else None
        cache = (decoder.start(mask if padded else None) if decoder is not None
                 else PreallocatedCache(self.model.config.num_hidden_layers, total))
        full_mask = torch.ones(batch, total, dtype=torch.long, device=self.device)  # [B, L + max_new]
        full_mask[:, :length] = mask
        out = self.model(input_ids=ids, attention_mask=mask if padded else None, image_features=features,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return {"cache": cache, "mask": full_mask if padded else None, "length": length, "decoder": decoder,
                "history": ids, "logits": out.logits[:, -1]}  # history [B, L + steps]: for repetition penalties

    def _advance(self, state: dict, rows: list[_Row], tokens: list[int]) -> None:
        """Feed each row's new token (a pad for finished rows) and keep the next logits [B, V]."""
        feed = torch.tensor([[t if row.finish is None else self.pad_id] for row, t in zip(rows, tokens)],
                            device=self.device)  # [B, 1]
        state["history"] = torch.cat([state["history"], feed], dim=1)
        seen = state["history"].shape[1]
        if state["decoder"] is not None:  # the fed token sits at buffer position seen - 1
            state["logits"] = state["decoder"].step(feed, seen - 1)
            return
        mask = state["mask"][:, :seen] if state["mask"] is not None else None
        out = self.model(input_ids=feed, attention_mask=mask, past_key_values=state["cache"], use_cache=True)
        state["logits"] = out.logits[:, -1]

    def _choose(self, rows: list[_Row], choosers: list[TokenChooser], history: torch.Tensor,
                logits: torch.Tensor) -> list[int]:
        """Next token of every row: one batched argmax when every row is plain greedy, else row by row."""
        if all(not c.processors and c.params.greedy for c in choosers):
            return logits.argmax(-1).tolist()
        return [c(history[i:i + 1, row.pad:], logits[i:i + 1]) if row.finish is None else self.pad_id
                for i, (row, c) in enumerate(zip(rows, choosers))]

    @staticmethod
    def _result(row: _Row, start: float, prefill_done: float) -> GenerationResult:
        now = time.perf_counter()
        return GenerationResult(row.text, list(row.tokens), row.finish, len(row.prompt_ids),
                                round(prefill_done - start, 6), round(now - prefill_done, 6))
