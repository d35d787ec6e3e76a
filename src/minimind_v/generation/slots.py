"""The KV memory of continuous batching: a fixed pool of slots, and the decode step over them.

    SlotPool     per layer keys and values [slots, Hkv, max_len, D], allocated once (at the first prefill stored);
                 a slot holds one request's prompt and answer so far, at positions 0 .. length - 1
    store        prefilled requests' keys/values per layer -> each one's slot's first positions
    decode       one token for each of the first n slots, every row at its own position:
                 tokens [n] at positions [n] -> logits [n, V]; each row writes its new key/value at its position
                 (scatter) and attends to positions 0 .. its position (a boolean mask [n, 1, 1, T])

Rows of the step whose slot is free run too (the slot's last token, or a pad token, at position 0, seeing only
itself) and are ignored, so a step covers slots 0 .. n - 1 whatever is free among them. Step by step (eager) a
step covers the used slots and the filled positions, rounded up to BUCKET. With fixed shapes
(`SlotPool(fixed=True)`: CUDA graphs, compiled first with `compile`) a step covers a power-of-two number of slots
(at least MIN_ROWS) and a power-of-two multiple of BUCKET positions, so a few shapes serve every mix of requests;
each shape is captured (or compiled) once: those up to WARM_SPAN positions at `warm_up`, longer ones at their first
use.
Rotary positions are the slot positions: prompts are prefilled with positions counted from 0 in every row.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .static_decode import Graphed, to_device

BUCKET = 64  # a step attends over the filled positions rounded up to a multiple of this (a power-of-two one when fixed)
WARM_SPAN = 256  # fixed steps over at most this many positions are made at warm-up
MIN_ROWS = 8  # a fixed step covers at least this many slots (on a GPU 8 rows cost what 1 does): fewer shapes


class SlotLayer(CacheLayerMixin):
    """One layer of one step's view of the pool: rows 0 .. n - 1, positions 0 .. T - 1."""

    def __init__(self, pool: "SlotPool", layer: int, rows: int, span: int, where: torch.Tensor):
        super().__init__()
        self.pool, self.layer, self.rows, self.span, self.where = pool, layer, rows, span, where
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the pool's buffers exist already
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value states [n, Hkv, 1, D] written at each row's position -> keys, values [n, Hkv, T, D]."""
        keys, values = self.pool.keys[self.layer], self.pool.values[self.layer]  # [slots, Hkv, max_len, D]
        rows = torch.arange(self.rows, device=keys.device)[:, None]  # [n, 1]
        heads = torch.arange(keys.shape[1], device=keys.device)[None, :]  # [1, Hkv]
        where = (rows, heads, self.where.view(-1, 1))  # broadcast to [n, Hkv]: each row's slot, heads, position
        # into the whole buffer (not a slice of it), so a compiled step writes in place instead of copying it
        keys.index_put_(where, key_states[:, :, 0].to(keys.dtype))  # [n, Hkv, D]
        values.index_put_(where, value_states[:, :, 0].to(values.dtype))
        return keys[:self.rows, :, :self.span], values[:self.rows, :, :self.span]  # [n, Hkv, T, D]

    def get_seq_length(self) -> int:
        return self.span - 1

    def get_max_length(self) -> int:
        return self.span

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.span, 0


class SlotView(Cache):
    """The cache a decode step hands the model: every layer's SlotLayer over the same rows and positions."""

    def __init__(self, pool: "SlotPool", rows: int, span: int, where: torch.Tensor):
        super().__init__(layers=[SlotLayer(pool, i, rows, span, where) for i in range(pool.num_layers)])


class FixedStep:
    """The step for `rows` slots over `span` positions, with static inputs: replayed as a CUDA graph, or compiled."""

    def __init__(self, pool: "SlotPool", rows: int, span: int):
        device = pool.device
        self.pool, self.rows = pool, rows
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)  # [n, 1]
        self.where = torch.zeros(rows, 1, dtype=torch.long, device=device)  # [n, 1]: position of the new token
        self.mask = torch.zeros(rows, 1, 1, span, dtype=torch.bool, device=device)  # [n, 1, 1, T]
        self.arange = torch.arange(span, device=device)
        self.cache = SlotView(pool, rows, span, self.where)
        self.run = self._forward
        if pool.compile:  # one compiled graph per step shape: let Dynamo keep them all (its default keeps 8)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.run = torch.compile(self._forward, dynamic=False)
        self.graphed = Graphed(self.run)  # recorded at the first step (its warm-up's pad rows write where it does)

    def __call__(self, ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """ids, where [n, 1] -> logits [n, V] (a view, valid until the next step)."""
        self.ids.copy_(ids)
        self.where.copy_(where)
        self.mask.copy_((self.arange <= self.where)[:, None, None, :])
        if self.pool.device.type != "cuda":  # the same fixed-shape step, without a graph (tests)
            return self.run()
        return self.graphed()

    def _forward(self) -> torch.Tensor:
        out = self.pool.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.where,
                              past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]  # [n, V]



class SlotPool:
    """`slots` slots of `max_len` positions for `model`'s keys and values; `fixed`: fixed-shape steps (graphs on
    CUDA, each compiled before its capture when `compile`)."""

    def __init__(self, model, slots: int, max_len: int, fixed: bool = False, compile: bool = False):
        if slots < 1 or max_len < 2:
            raise ValueError(f"a slot pool needs at least 1 slot of 2 positions (got {slots} x {max_len})")
        self.model, self.slots, self.max_len, self.fixed, self.compile = model, slots, max_len, fixed, compile
        self.num_layers, self.device = model.config.num_hidden_layers, model.device
        self.keys: list[torch.Tensor] = []  # per layer [slots, Hkv, max_len, D]
        self.values: list[torch.Tensor] = []
        self.steps: dict[tuple[int, int], FixedStep] = {}

    @property
    def allocated(self) -> bool:
        return bool(self.keys)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def store(self, slots: list[int], pads: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per layer (keys, values) [k, Hkv, L, D] of k prefilled prompts, row i left-padded by pads[i] -> slot
        slots[i]'s positions 0 .. L - pads[i] - 1 (one gather and one scatter per layer and tensor for all rows)."""
        if not self.allocated:
            for k, v in layers:
                self.keys.append(k.new_zeros(self.slots, k.shape[1], self.max_len, k.shape[3]))
                self.values.append(v.new_zeros(self.slots, v.shape[1], self.max_len, v.shape[3]))
        length = layers[0][0].shape[2]
        rows, columns, targets, positions = [], [], [], []
        for i, (slot, pad) in enumerate(zip(slots, pads)):
            rows += [i] * (length - pad)
            columns += range(pad, length)
            targets += [slot] * (length - pad)
            positions += range(length - pad)
        rows, columns, targets, positions = (to_device(x, self.device) for x in (rows, columns, targets, positions))
        for i, (k, v) in enumerate(layers):
            self.keys[i][targets, :, positions] = k[rows, :, columns]  # [N, Hkv, D]
            self.values[i][targets, :, positions] = v[rows, :, columns]

    def rows_for(self, used: int) -> int:
        """How many slots a step covers when slots 0 .. used - 1 may hold requests."""
        if not self.fixed:
            return used
        return min(max(1 << (used - 1).bit_length(), MIN_ROWS), self.slots)

    def decode(self, ids: torch.Tensor, where: torch.Tensor, filled: int | None = None) -> torch.Tensor:
        """ids [n, 1] (the tokens to feed), where [n, 1] (their positions) -> next-token logits [n', V], n' >= n
        (rows past n are pad rows). `filled`: where.max() + 1 when the caller knows it (reading it from a GPU
        would wait for the device)."""
        rows = self.rows_for(ids.shape[0])
        if rows > ids.shape[0]:  # pad rows: a pad token at position 0
            extra = rows - ids.shape[0]
            ids, where = torch.cat([ids, ids.new_zeros(extra, 1)]), torch.cat([where, where.new_zeros(extra, 1)])
        span = self.span_for(filled if filled is not None else int(where.max()) + 1)
        if self.fixed:
            if (rows, span) not in self.steps:
                self.steps[rows, span] = FixedStep(self, rows, span)
            return self.steps[rows, span](ids, where)
        mask = (torch.arange(span, device=self.device) <= where)[:, None, None, :]  # [n, 1, 1, T]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=where,
                         past_key_values=SlotView(self, rows, span, where), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]  # [n, V]

    def span_for(self, filled: int) -> int:
        """How many positions a step attends over when rows have filled up to `filled` (the new token included)."""
        blocks = -(-filled // BUCKET)
        if self.fixed:
            blocks = 1 << (blocks - 1).bit_length()
        return min(blocks * BUCKET, self.max_len)

    def warm_up(self) -> None:
        """Capture (or compile) the fixed step shapes over up to WARM_SPAN positions now rather than at their
        first use (the pool must be allocated: after one prefill)."""
        if not (self.fixed and self.allocated):
            return
        counts = sorted({self.rows_for(n) for n in range(1, self.slots + 1)})
        spans = sorted({self.span_for(n) for n in range(1, min(WARM_SPAN, self.max_len) + 1)})
        for rows in counts:
            for span in spans:
                zeros = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
                self.decode(zeros, zeros + span - 1)
