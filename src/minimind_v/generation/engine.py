"""The generation engine behind chat, the API server, the web demo and bench.

    requests (chat messages or raw text with `<image>` markers, PIL images, SamplingParams)
    -> left-padded batch [B, L] + image features [num_images, T, ve]
    -> prefill (images spliced in) into a KV cache preallocated for L + max_new_tokens
    -> decode one token per step for every unfinished row (a replayed CUDA graph on a GPU, static_decode.py; a
       greedy batch chains up to CHAIN steps in one replay); each row stops on EOS, a stop string or its own limit
    -> text deltas as they are decoded (`stream`), or whole results (`generate`)

One batch runs at a time (a lock), so concurrent callers queue instead of corrupting each other's cache. The lock is
held while a `stream` generator is open: a consumer that may stop reading must close it, or use a worker
(worker.py: one thread owns the engine). A request's `cancel` event, when set, ends that request at the next step,
or at the end of the chain of steps running (finish_reason "cancelled"); a request cancelled before its batch
starts costs no prefill.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from PIL import Image

from ..models.image_features import ImageFeatures
from ..models.vision_tower import image2tensor
from .kv_cache import PreallocatedCache
from .requests import GenerationRequest, GenerationResult, PromptEncoder, RequestError, StreamDelta
from .rows import Row, text_decoder
from .sampling import TokenChooser
from .static_decode import DecoderPool, static_possible

CHAIN = 16  # greedy fixed-shape steps per replay on a GPU: the host reads tokens back once per 16, not every token


@dataclass
class DecodeState:
    """A batch between steps: its cache (or fixed-shape decoder), the padding mask, the tokens so far, the logits."""
    cache: object  # PreallocatedCache, or the decoder's own
    mask: torch.Tensor | None  # [B, L + max_new]: 1 on real tokens (None: no padding)
    decoder: object | None  # a fixed-shape step (static_decode.py), or None: step by step
    history: torch.Tensor  # [B, L + steps]: the tokens so far, for repetition penalties
    logits: torch.Tensor  # [B, V]: the next token's


class Engine:
    def __init__(self, model, tokenizer, features: ImageFeatures | None = None, cuda_graphs: bool = True,
                 compile: bool = False, chain: int | None = None):
        """`features`: the tower behind a feature cache (evaluation reuses cached features); by default the
        model's own tower, uncached. `cuda_graphs`: replay decode steps as CUDA graphs where possible;
        `compile`: torch.compile the fixed-shape step (fewer, fused kernels; compiles once per batch shape) - on
        CUDA before capturing it, on a CPU with the weights frozen into it (build a new Engine after changing them)."""
        self.model, self.tokenizer = model.eval(), tokenizer
        on_gpu = model.device.type == "cuda"
        wanted = cuda_graphs if on_gpu else compile  # a CPU gains from static steps only when they are compiled
        self.decoders = DecoderPool(compile=compile) if wanted and static_possible(model) else None
        self.chain = chain if chain is not None else CHAIN if on_gpu else 1
        tower = model.vision_tower
        self.features = features or (ImageFeatures(tower) if tower is not None else None)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.eos_ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_ids.discard(None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.detokenize = text_decoder(tokenizer)  # ids -> text, as tokenizer.decode
        self.prompts = PromptEncoder(tokenizer, model.config, takes_images=self.features is not None)
        self.context = self.prompts.context
        self.lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def decoding_mode(self) -> str:
        """How decode steps run: 'step by step', '(compiled) CUDA graphs' or 'compiled static steps', with the
        number of greedy steps a replay chains when more than one."""
        if self.decoders is None:
            return "step by step"
        mode = "CUDA graphs" if self.device.type == "cuda" else "static steps"
        mode = f"compiled {mode}" if self.decoders.compile else mode
        return mode + (f", up to {self.chain} greedy steps a replay" if self.chain > 1 else "")

    def check_prompt_size(self, request: GenerationRequest) -> None:
        """RequestError when the prompt's text is too long to fit the context whatever its tokens (cheap: counts
        characters, before the slow tokenization of a huge text)."""
        self.prompts.check_prompt_size(request)

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> the vision tower's pixel values [3, H, W]: what a request can carry instead of the image
        (a queued request then holds a small tensor, not the decoded picture)."""
        if self.features is None:
            raise RequestError("this model has no vision tower, so it cannot take images")
        return image2tensor(image, self.features.tower.processor)[0]  # [1, 3, H, W] -> [3, H, W]

    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids, checked (images against `<image>` markers, the context length); a request is tokenized
        once (the ids are kept on it)."""
        return self.prompts.encode(request)

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
            rows.append(Row(self.detokenize, self.eos_ids, ids, r.params,
                            min(r.params.max_new_tokens, self.context - len(ids))))
        with self.lock:
            yield from self._decode(rows, requests)

    # Inference mode is thread-local and a streaming caller (a web server) may resume this generator on another
    # thread, so each step enters it afresh and no `yield` happens inside it.
    def _decode(self, rows: list[Row], requests: list[GenerationRequest]) -> Iterator[StreamDelta]:
        start = time.perf_counter()
        cancels = [r.cancel for r in requests]
        yield from self._cancelled(rows, cancels, start, start)
        if all(row.finish is not None for row in rows):
            return  # every request was cancelled before its prefill
        with torch.inference_mode():
            state = self._prefill(rows, requests)
            choosers = [TokenChooser(row.params, self.device) for row in rows]
            runs = [[token] for token in self._choose(rows, choosers, state.history, state.logits)]  # device done
        prefill_done = time.perf_counter()  # prefill = time to the first token
        while True:
            yield from self._cancelled(rows, cancels, start, prefill_done)
            for i, (row, run) in enumerate(zip(rows, runs)):
                if row.finish is not None:
                    continue  # ended before (cancelled, or a chain's tokens after its end)
                delta = "".join(row.push(token) for token in run if row.finish is None)
                if row.finish is not None:
                    yield StreamDelta(i, delta, self._result(row, start, prefill_done))
                elif delta:
                    yield StreamDelta(i, delta)
            if all(row.finish is not None for row in rows):
                return
            with torch.inference_mode():
                runs = self._advance(state, rows, runs, choosers)

    def _cancelled(self, rows: list[Row], cancels: Iterable[threading.Event | None], start: float,
                   prefill_done: float) -> Iterator[StreamDelta]:
        """Finish every unfinished row whose request is cancelled: its last delta, finish_reason "cancelled" and
        the text released so far."""
        for i, (row, cancel) in enumerate(zip(rows, cancels)):
            if row.finish is None and cancel is not None and cancel.is_set():
                row.end("cancelled")
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

    def _prefill(self, rows: list[Row], requests: list[GenerationRequest]) -> DecodeState:
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
        return DecodeState(cache, full_mask if padded else None, decoder, ids, out.logits[:, -1])

    def _advance(self, state: DecodeState, rows: list[Row], runs: list[list[int]],
                 choosers: list[TokenChooser]) -> list[list[int]]:
        """Feed each running row its last token (a pad for finished rows): -> the next tokens of every row (an
        empty run for finished rows): one, or a chain of greedy steps in one replay."""
        feed = torch.tensor([[run[-1] if row.finish is None else self.pad_id] for row, run in zip(rows, runs)],
                            device=self.device)  # [B, 1]
        position = state.history.shape[1]  # the fed token's buffer position
        count = self._chain_length(state, rows, choosers, position)
        if count > 1:
            chosen = state.decoder.chain(feed, position, count)  # [B, count]
            state.history = torch.cat([state.history, feed, chosen[:, :-1]], dim=1)
            return [tokens if row.finish is None else [] for row, tokens in zip(rows, chosen.tolist())]
        state.history = torch.cat([state.history, feed], dim=1)
        if state.decoder is not None:
            state.logits = state.decoder.step(feed, position)
        else:
            mask = state.mask[:, :position + 1] if state.mask is not None else None
            out = self.model(input_ids=feed, attention_mask=mask, past_key_values=state.cache, use_cache=True)
            state.logits = out.logits[:, -1]
        return [[token] if row.finish is None else [] for row, token in
                zip(rows, self._choose(rows, choosers, state.history, state.logits))]

    def _chain_length(self, state: DecodeState, rows: list[Row], choosers: list[TokenChooser], position: int) -> int:
        """How many greedy steps the next replay may chain: a power of two up to `self.chain`, no more than any
        running row still needs nor than the buffer holds; 1 when a row samples or penalises repetition."""
        if state.decoder is None or self.chain < 2 or not all(c.argmax_only for c in choosers):
            return 1
        needed = max(row.max_new - len(row.tokens) for row in rows if row.finish is None)
        limit = min(self.chain, needed, state.decoder.max_len - position)
        return 1 << (max(limit, 1).bit_length() - 1)

    def _choose(self, rows: list[Row], choosers: list[TokenChooser], history: torch.Tensor,
                logits: torch.Tensor) -> list[int]:
        """Next token of every row: one batched argmax when every row is plain greedy, else row by row."""
        if all(c.argmax_only for c in choosers):
            return logits.argmax(-1).tolist()
        return [c(history[i:i + 1, row.pad:], logits[i:i + 1]) if row.finish is None else self.pad_id
                for i, (row, c) in enumerate(zip(rows, choosers))]

    @staticmethod
    def _result(row: Row, start: float, prefill_done: float) -> GenerationResult:
        now = time.perf_counter()
        return GenerationResult(row.text, list(row.tokens), row.finish, len(row.prompt_ids),
                                round(prefill_done - start, 6), round(now - prefill_done, 6))
