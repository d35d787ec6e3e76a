"""Continuous batching: requests join and leave a running decode batch at every step (as vLLM's scheduler does).

    admit(requests)   each takes a free slot (slots.py); their prompts are prefilled together (images spliced in,
                      left-padded, rotary positions counted from 0 in every row), their keys/values copied into
                      their slots, and each gets its first token
    step()            one token for every running request, each at its own position, in one forward pass
    a request that ends (EOS, a stop string, its limit, cancelled, past its deadline) frees its slot at once

Overlapped (on a GPU, while every running row is greedy or drawn with the batch): the tokens a step chooses stay on
the device as the next step's input, so `step()` launches step N + 1 first and only then reads step N's tokens
back and handles its rows (text, stop strings, ends) while the GPU computes: the host's work per step hides behind
the device's instead of adding to it. The price: a step's deltas come one call later, and a row that ended at
step N (EOS, a stop string) was already in step N + 1, whose token for it is dropped. Rows with their own random
generator or a repetition penalty need their logits on the host, so a batch with such a row steps in lockstep.

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
from .sampling import TokenChooser, batchable, draw_batch
from .slots import SlotPool
from .static_decode import to_device


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
    length: int = 0  # positions filled, counting the step in flight
    launched: int = 0  # tokens chosen or being chosen: the prefill's and one per step launched
    first_token: float = 0.0


@dataclass
class InFlight:
    """A launched step: its rows (slot, Running), its chosen tokens on their way to the host, and when they are
    there."""
    items: list[tuple[int, Running]]
    tokens: torch.Tensor  # [n]: by slot
    arrived: object  # torch.cuda.Event, or None on a CPU


def fits_a_slot(ids: list[int], max_len: int) -> list[int]:
    """`ids`, or RequestError when a prompt this long leaves no room for a new token in a slot of `max_len`."""
    if len(ids) >= max_len:
        raise RequestError(f"the prompt is {len(ids)} tokens; this server holds at most {max_len} tokens per request")
    return ids


class ContinuousBatch:
    """Up to `slots` requests decoding together over `engine`'s model; each holds at most `max_len` positions
    (default: the model's context). `overlap`: launch a step before handling the previous one (default: on a GPU)."""

    def __init__(self, engine: Engine, slots: int = 64, max_len: int | None = None, overlap: bool | None = None):
        self.engine, self.model = engine, engine.model
        self.max_len = min(max_len or engine.context, engine.context)
        # CUDA graphs where the engine uses them; on a CPU step by step (a compiled fixed-shape step was slower here)
        fixed = engine.decoders is not None and engine.device.type == "cuda"
        compile = fixed and engine.decoders.compile
        self.pool = SlotPool(self.model, slots, self.max_len, fixed=fixed, compile=compile)
        self.running: list[Running | None] = [None] * slots
        self.overlap = engine.device.type == "cuda" if overlap is None else overlap
        self.next_ids = torch.full((slots, 1), engine.pad_id, dtype=torch.long, device=engine.device)  # [slots, 1]
        self.inflight: InFlight | None = None
        # where chosen tokens land on the host: two buffers for steps (one in flight, one being read), one for
        # prefills; pinned and allocated once on a GPU (freeing pinned memory mid-run can break a graph's capture)
        on_gpu = engine.device.type == "cuda"
        self.landing = [torch.zeros(slots, dtype=torch.long, pin_memory=on_gpu) for _ in range(3)]
        self.arrived = [torch.cuda.Event() if on_gpu else None for _ in range(3)]
        self.flip = 0

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.running)

    @property
    def free(self) -> int:
        return self.running.count(None)

    def check(self, request: GenerationRequest) -> list[int]:
        """The prompt's ids; RequestError when it leaves no room for a new token in a slot."""
        return fits_a_slot(self.engine.encode(request), self.max_len)

    def admit(self, entries: list[tuple[object, GenerationRequest, float | None]]) -> list[tuple[object, StreamDelta]]:
        """(key, request, deadline) for at most `free` requests -> their first deltas (a request may end at once)."""
        if len(entries) > self.free:
            raise ValueError(f"{len(entries)} requests but {self.free} free slots")
        start, slots, running = time.perf_counter(), [], []
        for key, request, deadline in entries:
            ids = self.check(request)
            slot = self.running.index(None, slots[-1] + 1 if slots else 0)
            row = Row(self.engine.detokenize, self.engine.eos_ids, ids, request.params,
                      min(request.params.max_new_tokens, self.max_len - len(ids)))
            slots.append(slot)
            running.append(Running(key, request, row, TokenChooser(request.params, self.engine.device), start,
                                   deadline, length=len(ids)))
        with torch.inference_mode():
            logits = self._prefill(running, slots)  # [k, V]
            tokens = self._choose(list(enumerate(running)), logits)  # [k]
            self.next_ids[to_device(slots, self.engine.device)] = tokens[:, None]
        for slot, item in zip(slots, running):
            self.running[slot], item.launched = item, 1
        first = self._land(tokens, 2)
        return self._collect(InFlight(list(zip(slots, running)), *first), by_slot=False)

    def step(self) -> list[tuple[object, StreamDelta]]:
        """One token for every running request; overlapped: launch this step, then hand over the previous one's."""
        if self.overlap and all(self._on_device(r) for r in self.running if r is not None):
            launched = self._launch(self._generating())
            out, self.inflight = self._collect(self.inflight), launched
            return out
        out, self.inflight = self._collect(self.inflight), None
        return out + self._collect(self._launch(self._generating()))

    def _generating(self) -> list[tuple[int, Running]]:
        """The rows that still need a token (one whose last token is in flight does not)."""
        return [(i, r) for i, r in enumerate(self.running) if r is not None and r.launched < r.row.max_new]

    def _launch(self, live: list[tuple[int, Running]]) -> InFlight | None:
        """Run one decode step for `live` rows (slots 0 .. used - 1: the others feed a stale token at position 0,
        seeing only itself); the chosen tokens become each slot's next input on the device."""
        if not live:
            return None
        used = live[-1][0] + 1
        where, filled = [0] * used, 0
        for slot, r in live:
            where[slot], filled = r.length, max(filled, r.length + 1)
        with torch.inference_mode():
            where = to_device(where, self.engine.device)[:, None]  # [used, 1]
            logits = self.pool.decode(self.next_ids[:used], where, filled)  # [n', V]
            tokens = self._choose(live, logits)  # [n']
            self.next_ids[:used] = tokens[:used, None]
        for _, r in live:
            r.length, r.launched = r.length + 1, r.launched + 1
        self.flip ^= 1
        return InFlight(live, *self._land(tokens[:used], self.flip))

    def _land(self, tokens: torch.Tensor, buffer: int) -> tuple[torch.Tensor, object]:
        """Start copying tokens [n] into host buffer `buffer`: (its first n entries, the event that says they are
        there, or None on a CPU)."""
        host = self.landing[buffer][:tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        if self.arrived[buffer] is not None:
            self.arrived[buffer].record()
        return host, self.arrived[buffer]

    def _collect(self, flight: InFlight | None, by_slot: bool = True) -> list[tuple[object, StreamDelta]]:
        """Hand over a launched step's tokens (by slot; else in the order of its rows) to its rows that still run
        (one ended meanwhile is skipped)."""
        if flight is None:
            return []
        if flight.arrived is not None:
            flight.arrived.synchronize()  # waits without holding the GIL: the event loop runs meanwhile
        tokens = flight.tokens.tolist()
        items = [(k, slot, r) for k, (slot, r) in enumerate(flight.items) if self.running[slot] is r]
        chosen = [tokens[slot if by_slot else k] for k, slot, _ in items]
        return self._push([(slot, r) for _, slot, r in items], chosen)

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
        self.running, self.inflight = [None] * len(self.running), None
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
        pads = [length - len(prompt) for prompt in prompts]
        cache = PreallocatedCache(self.model.config.num_hidden_layers, length)
        out = self.model(input_ids=ids, attention_mask=mask if any(pads) else None, position_ids=positions,
                         image_features=features, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.pool.store(slots, pads, [(layer.keys, layer.values) for layer in cache.layers])
        return out.logits[:, -1]

    def _push(self, items: list[tuple[int, Running]], tokens: list[int]) -> list[tuple[object, StreamDelta]]:
        """Push each row its token; free the slots of rows that ended."""
        now, out = time.perf_counter(), []
        for (slot, r), token in zip(items, tokens):
            r.first_token = r.first_token or now
            delta = r.row.push(token)
            if r.row.finish is not None:
                out.append((r.key, StreamDelta(0, delta, self._result(r))))
                self.running[slot] = None
            elif delta:
                out.append((r.key, StreamDelta(0, delta)))
        return out

    def _choose(self, items: list[tuple[int, Running]], logits: torch.Tensor) -> torch.Tensor:
        """Next tokens for logits [n, V], row `i` of logits for each (i, Running) of `items` -> [n] on the logits'
        device: greedy rows by argmax, unseeded sampled rows drawn together (sampling.batchable), the others
        (seeded, repetition penalty) by their own chooser. Nothing here waits for the device but those others."""
        tokens = logits.argmax(-1)  # [n]
        together = [(i, r.chooser.params) for i, r in items if batchable(r.chooser.params)]
        if together:
            rows = to_device([i for i, _ in together], logits.device)
            tokens[rows] = draw_batch(logits[rows], [p for _, p in together])
        for i, r in items:
            if not self._on_device(r):
                history = torch.tensor([r.row.prompt_ids + r.row.tokens], device=logits.device)
                tokens[i] = r.chooser(history, logits[i:i + 1])
        return tokens

    @staticmethod
    def _on_device(r: Running) -> bool:
        """Whether the row's next token is chosen without its logits on the host."""
        return batchable(r.chooser.params) or r.chooser.argmax_only

    @staticmethod
    def _result(r: Running) -> GenerationResult:
        first = r.first_token or time.perf_counter()
        return GenerationResult(r.row.text, list(r.row.tokens), r.row.finish, len(r.row.prompt_ids),
                                round(first - r.start, 6), round(time.perf_counter() - first, 6))
