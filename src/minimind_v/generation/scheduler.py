"""Continuous batching: requests join and leave a running decode batch at every step (as vLLM's scheduler does).

    admit(requests)   each takes a free slot (slots.py); their prompts are prefilled together (images spliced in,
                      left-padded, rotary positions counted from 0 in every row), their keys/values copied into
                      their slots, and each gets its first token
    step()            one token for every running request, each at its own position, in one forward pass
    a request that ends (EOS, a stop string, its limit, cancelled, past its deadline) frees its slot at once

Both return (key, StreamDelta) pairs: the caller's key of the request, and its new text (the last delta of a
request carries its result). KV memory is the pool's, allocated once: a request is admitted only into a free slot,
and a request needs its prompt plus at least one new token to fit a slot (`check`). Greedy answers do not depend on
what else runs: a row sees only its own slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .engine import Engine
from .kv_cache import PreallocatedCache
from .requests import GenerationRequest, GenerationResult, RequestError, StreamDelta
from .rows import Row
from .sampling import TokenChooser, batchable, sample_batch
from .slots import SlotPool


@dataclass
class Running:
    """A request in a slot: its row (tokens, text, stop handling), token chooser, filled positions, and the token
    chosen last (fed at the next step)."""
    key: object
    request: GenerationRequest
    row: Row
    chooser: TokenChooser
    start: float
    deadline: float | None
    length: int = 0
    pending: int = 0
    first_token: float = 0.0


class ContinuousBatch:
    """Up to `slots` requests decoding together over `engine`'s model; each holds at most `max_len` positions
    (default: the model's context)."""

    def __init__(self, engine: Engine, slots: int = 64, max_len: int | None = None):
        self.engine, self.model = engine, engine.model
        self.max_len = min(max_len or engine.context, engine.context)
        # CUDA graphs where the engine uses them; on a CPU step by step (a compiled fixed-shape step was slower here)
        fixed = engine.decoders is not None and engine.device.type == "cuda"
        compile = fixed and engine.decoders.compile
        self.pool = SlotPool(self.model, slots, self.max_len, fixed=fixed, compile=compile)
        self.running: list[Running | None] = [None] * slots

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.running)

    @property
    def free(self) -> int:
        return self.running.count(None)

    def check(self, request: GenerationRequest) -> list[int]:
        """The prompt's ids; RequestError when it leaves no room for a new token in a slot."""
        ids = self.engine.encode(request)
        if len(ids) >= self.max_len:
            raise RequestError(f"the prompt is {len(ids)} tokens; this server holds at most {self.max_len} tokens "
                               "per request")
        return ids

    def admit(self, entries: list[tuple[object, GenerationRequest, float | None]]) -> list[tuple[object, StreamDelta]]:
        """(key, request, deadline) for at most `free` requests -> their first deltas (a request may end at once)."""
        if len(entries) > self.free:
            raise ValueError(f"{len(entries)} requests but {self.free} free slots")
        start, slots, running = time.perf_counter(), [], []
        for key, request, deadline in entries:
            ids = self.check(request)
            slot = self.running.index(None, slots[-1] + 1 if slots else 0)
            row = Row(self.engine.tokenizer.decode, self.engine.eos_ids, ids, request.params,
                      min(request.params.max_new_tokens, self.max_len - len(ids)))
            slots.append(slot)
            running.append(Running(key, request, row, TokenChooser(request.params, self.engine.device), start,
                                   deadline, length=len(ids)))
        with torch.inference_mode():
            logits = self._prefill(running, slots)  # [k, V]
        for slot, item in zip(slots, running):
            self.running[slot] = item
        return self._advance(list(zip(slots, running)), logits)

    def step(self) -> list[tuple[object, StreamDelta]]:
        """One token for every running request."""
        used = max((i for i, r in enumerate(self.running) if r is not None), default=-1) + 1
        if not used:
            return []
        live = [(i, r) for i, r in enumerate(self.running[:used]) if r is not None]
        pad = self.engine.pad_id
        ids = torch.tensor([[r.pending if r is not None else pad] for r in self.running[:used]],
                           device=self.engine.device)  # [n, 1]
        where = torch.tensor([[r.length if r is not None else 0] for r in self.running[:used]],
                             device=self.engine.device)  # [n, 1]
        with torch.inference_mode():
            logits = self.pool.decode(ids, where)  # [n', V]
        for _, r in live:
            r.length += 1
        return self._advance(live, logits[[i for i, _ in live]])

    def expire(self, now: float | None = None) -> list[tuple[object, StreamDelta]]:
        """End every running request that is cancelled ("cancelled") or past its deadline ("timeout"); the text
        released so far is its result's."""
        now, out = now if now is not None else time.monotonic(), []
        for slot, r in enumerate(self.running):
            if r is None:
                continue
            cancel = r.request.cancel
            reason = ("cancelled" if cancel is not None and cancel.is_set() else
                      "timeout" if r.deadline is not None and now >= r.deadline else None)
            if reason:
                r.row.end(reason)
                out.append((r.key, StreamDelta(0, "", self._result(r))))
                self.running[slot] = None
        return out

    def clear(self) -> list[object]:
        """Free every slot (after an error): the keys of the requests that were running."""
        keys = [r.key for r in self.running if r is not None]
        self.running = [None] * len(self.running)
        return keys

    def warm_up(self) -> None:
        """Allocate the pool (one tiny prefill) and capture or compile its fixed step shapes now."""
        if self.pool.fixed and not self.pool.allocated:
            request = GenerationRequest(text=self.engine.tokenizer.decode([self.engine.pad_id]))
            request.prompt_ids = [self.engine.pad_id]
            request.params.max_new_tokens = 1
            self.admit([(None, request, None)])
        with torch.inference_mode():
            self.pool.warm_up()

    def _prefill(self, running: list[Running], slots: list[int]) -> torch.Tensor:
        """Prompts (left-padded, positions from 0 in each row) -> slots; the next-token logits [k, V]."""
        prompts = [r.row.prompt_ids for r in running]
        ids, mask, features = self.engine.prepare([r.request for r in running], prompts)  # [k, L], [k, L]
        length = ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [k, L]
        padded = bool((mask == 0).any())
        cache = PreallocatedCache(self.model.config.num_hidden_layers, length)
        out = self.model(input_ids=ids, attention_mask=mask if padded else None, position_ids=positions,
                         image_features=features, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for i, (slot, prompt) in enumerate(zip(slots, prompts)):
            pad = length - len(prompt)
            self.pool.store(slot, [(layer.keys[i, :, pad:], layer.values[i, :, pad:]) for layer in cache.layers])
        return out.logits[:, -1]

    def _advance(self, items: list[tuple[int, Running]], logits: torch.Tensor) -> list[tuple[object, StreamDelta]]:
        """Choose each row's next token from logits [k, V]; push it; free the slots of rows that ended."""
        tokens = self._choose(items, logits)
        now, out = time.perf_counter(), []
        for (slot, r), token in zip(items, tokens):
            r.first_token = r.first_token or now
            delta = r.row.push(token)
            r.pending = token
            if r.row.finish is not None:
                out.append((r.key, StreamDelta(0, delta, self._result(r))))
                self.running[slot] = None
            elif delta:
                out.append((r.key, StreamDelta(0, delta)))
        return out

    @staticmethod
    def _choose(items: list[tuple[int, Running]], logits: torch.Tensor) -> list[int]:
        """Next tokens for logits [k, V]: greedy rows by argmax, unseeded sampled rows drawn together
        (sampling.batchable), the others (seeded, repetition penalty) by their own chooser."""
        params = [r.chooser.params for _, r in items]
        if all(not r.chooser.processors and p.greedy for (_, r), p in zip(items, params)):
            return logits.argmax(-1).tolist()
        together = [k for k, p in enumerate(params) if batchable(p)]
        drawn = dict(zip(together, sample_batch(logits[together], [params[k] for k in together]))) if together else {}
        return [drawn[k] if k in drawn else
                r.chooser(torch.tensor([r.row.prompt_ids + r.row.tokens], device=logits.device), logits[k:k + 1])
                for k, (_, r) in enumerate(items)]

    @staticmethod
    def _result(r: Running) -> GenerationResult:
        first = r.first_token or time.perf_counter()
        return GenerationResult(r.row.text, list(r.row.tokens), r.row.finish, len(r.row.prompt_ids),
                                round(first - r.start, 6), round(time.perf_counter() - first, 6))
