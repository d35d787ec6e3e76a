"""Decode steps of fixed shape, replayed as a CUDA graph.

The prompt is prefilled as usual into a `StaticCache` (the engine's preallocated buffers). After that every decode step
has the same shapes: one token per row, attention over the whole buffer [B, Hkv, max_len, D] with a boolean mask of
the positions filled so far, and the new key/value written at a position held in a tensor (`index_copy_`). A step of
the same shapes can be captured once as a CUDA graph and replayed: one launch instead of one Python round trip per
kernel, which is what bounds a small model's decoding on a GPU.

    StaticCache        PreallocatedCache + `static` mode: writes at `position` (a tensor), returns whole buffers
    StaticDecoder      per (batch, max_len): the static inputs, the captured graphs, `step(tokens, position)`, and
                       `chain(tokens, position, count)`: `count` greedy steps in one replay (each step's argmax fed
                       to the next on the device), so the host waits once per `count` tokens instead of every token
    DecoderPool        the engine's few decoders, reused across generations of the same (batch, max_len bucket)

Models that answer `supports_static_decode` use static steps - dense MiniMind models, and Hugging Face backbones that
attend under the 4-D mask they are given (a mixture of experts routes with data-dependent shapes; a sliding window
would need its own mask): on CUDA as graphs (with `Engine(compile=True)` compiled before their capture, the weights
frozen in: `step_options`), on a CPU only when compiled (each one-row matrix product as one fused pass over its
weight, see `cpu_step_options`; eager static steps are no faster than the dynamic cache there). Elsewhere the engine
decodes step by step. `StaticDecoder(use_graph=False)` runs the same static step without a graph, which the tests
compare with the dynamic cache.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from unittest import mock

import torch

from .kv_cache import PreallocatedCache, PreallocatedLayer

BUCKET = 64  # max_len is rounded up to a multiple of this, so generations of similar length share a graph


class StaticLayer(PreallocatedLayer):
    def __init__(self, max_len: int, position: torch.Tensor):
        super().__init__(max_len)
        self.position, self.static = position, False  # position: [1] long, shared by every layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.static:
            return super().update(key_states, value_states, *args, **kwargs)
        self.keys.index_copy_(2, self.position, key_states)  # [B, Hkv, 1, D] into [B, Hkv, max_len, D]
        self.values.index_copy_(2, self.position, value_states)
        return self.keys, self.values  # the whole buffers; the mask hides what is not written yet


class StaticCache(PreallocatedCache):
    def __init__(self, num_layers: int, max_len: int, device: torch.device):
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        super(PreallocatedCache, self).__init__(layers=[StaticLayer(max_len, self.position)
                                                        for _ in range(num_layers)])

    def set_static(self, static: bool) -> None:
        for layer in self.layers:
            layer.static = static

    def restart(self) -> None:
        """Empty again (the buffers stay allocated, so a captured graph stays valid)."""
        for layer in self.layers:
            layer.length, layer.static = 0, False


class StaticDecoder:
    """Fixed-shape decode steps for `batch` rows over a `max_len` cache; CUDA graphs when `use_graph`."""

    def __init__(self, model, batch: int, max_len: int, use_graph: bool, compile: bool = False):
        device = model.device
        self.model, self.use_graph = model, use_graph
        self.run = torch.compile(self._forward, dynamic=False) if compile else self._forward  # fuses the small ops
        self.options = step_options(device) if compile else contextlib.nullcontext
        # recorded at the first step (its warm-up writes land at the current position, which that step rewrites)
        self.graphed = Graphed(lambda: self.run(self.ids, self.mask))
        self.cache = StaticCache(model.config.num_hidden_layers, max_len, device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # [B, max_len]: not padding
        self.mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=device)  # [B, 1, 1, max_len]
        self.arange = torch.arange(max_len, device=device)
        self.feed = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]: a chain's first input
        self.base = torch.zeros(1, dtype=torch.long, device=device)  # [1]: its buffer position
        self.chains: dict[int, Graphed] = {}  # by count

    @property
    def max_len(self) -> int:
        return self.arange.shape[0]

    def start(self, padding_mask: torch.Tensor | None) -> StaticCache:
        """Before a prefill: padding_mask [B, L] (1 = token) of the prompt, or None; returns the emptied cache."""
        self.cache.restart()
        self.valid.fill_(True)
        if padding_mask is not None:
            self.valid[:, :padding_mask.shape[1]] = padding_mask.bool()
        return self.cache

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """tokens [B, 1] at buffer `position` -> next-token logits [B, V] (a view, valid until the next step)."""
        self.ids.copy_(tokens)
        self.cache.position.fill_(position)
        self.mask.copy_((self.valid & (self.arange <= position))[:, None, None, :])
        self.cache.set_static(True)
        with self.options():
            return self.graphed() if self.use_graph else self.run(self.ids, self.mask)

    def chain(self, tokens: torch.Tensor, position: int, count: int) -> torch.Tensor:
        """Greedy decoding of `count` steps: tokens [B, 1] fed at buffer `position` -> the next `count` tokens of
        every row [B, count] (a view, valid until the next call); the positions up to position + count - 1 must
        lie in the buffer."""
        if position + count > self.max_len:
            raise ValueError(f"a chain of {count} steps from position {position} leaves the {self.max_len}-position "
                             "buffer")
        self.feed.copy_(tokens)
        self.base.fill_(position)
        self.cache.set_static(True)
        with self.options():
            if not self.use_graph:
                return self._chain(count)
            if count not in self.chains:
                self.chains[count] = Graphed(lambda: self._chain(count))  # recorded once per count, as `step` is
            return self.chains[count]()

    def _chain(self, count: int) -> torch.Tensor:
        """`count` steps from the static inputs `feed` and `base` (left unchanged, so a graph's warm-up runs and
        its replays all start from them). The step's inputs are handed over, not copied into place: each step's
        mask is a slice of all of them, computed at once, and its argmax is the next step's input."""
        positions = self.base + torch.arange(count, device=self.base.device)  # [count]
        masks = self.valid[None] & (self.arange[None, None] <= positions[:, None, None])  # [count, B, max_len]
        masks = masks.view(count, *self.mask.shape)  # [count, B, 1, 1, max_len]: each slice shaped as `mask`
        ids, chosen = self.feed, []
        for j in range(count):
            self.cache.position.copy_(positions[j:j + 1])  # where every layer writes, and the rotary position
            ids = self.run(ids, masks[j]).argmax(-1, keepdim=True)  # [B, 1]
            chosen.append(ids)
        return torch.cat(chosen, dim=1)  # [B, count]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids [B, 1] at buffer position `cache.position` (the rotary position of every row too), mask
        [B, 1, 1, max_len] -> next-token logits [B, V]."""
        positions = self.cache.position.view(1, 1).expand(ids.shape[0], 1)  # [B, 1]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]  # [B, V]


class DecoderPool:
    """At most `size` decoders, least recently used dropped first."""

    def __init__(self, size: int = 4, compile: bool = False):
        self.size, self.compile, self.decoders = size, compile, OrderedDict()

    def get(self, model, batch: int, length: int) -> StaticDecoder:
        """A decoder for `batch` rows of up to `length` positions; graphs on CUDA, eager static steps elsewhere."""
        max_len, use_graph = -(-length // BUCKET) * BUCKET, model.device.type == "cuda"
        key = (batch, max_len, use_graph)
        if key not in self.decoders:
            self.decoders[key] = StaticDecoder(model, batch, max_len, use_graph, self.compile)
            while len(self.decoders) > self.size:
                self.decoders.popitem(last=False)
        self.decoders.move_to_end(key)
        return self.decoders[key]


def step_options(device: torch.device):
    """How Inductor compiles a step on `device` (a context manager factory). The engine runs the model under
    inference_mode and never changes its weights, so they are frozen into the graph as constants (on a GPU this also
    folds the concatenated weights of the fused projections, see models/attention.py, into one weight each). On a GPU
    Inductor also tunes each generated kernel's block sizes by coordinate descent: a one-row step is a chain of tiny
    kernels, whose default launch shapes leave time on the table (+10% tokens/s at batch 1 on an H200)."""
    gpu = {"freezing": True, "coordinate_descent_tuning": True}
    return cpu_step_options if device.type == "cpu" else lambda: torch._inductor.config.patch(gpu)


@contextlib.contextmanager
def cpu_step_options():
    """On a CPU a one-row step is a chain of matrix-vector products, bound by reading the weights once; MKL's GEMV
    reads them at about half of a 2-core machine's memory bandwidth. Inductor's own `decompose_mm_pass` rewrites
    each [1, K] x [K, N] product into a multiply and a sum, which it fuses into one vectorised pass over the
    weight: its CPU size limit (2,048) is lifted to cover every layer, and the weights stay unpacked (MKL's packed
    layout only serves its own kernels; at batch 8 it was no faster)."""
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    options = {"freezing": True, "cpp.weight_prepack": False, "post_grad_fusion_options": {"decompose_mm_pass": {}}}
    with torch._inductor.config.patch(options), \
            mock.patch.object(decompose_mem_bound_mm, "cpu_max_other_dimension_decomposition", 1 << 30):
        yield


def to_device(values: list, device: torch.device) -> torch.Tensor:
    """Host numbers -> a tensor on `device`, without waiting for the device's queued work (a blocking copy to a GPU
    waits for every kernel before it)."""
    return torch.tensor(values).to(device, non_blocking=True)


def static_possible(model) -> bool:
    """Whether the model decodes through one fixed-shape step (graphs on CUDA, compiled steps on a CPU)."""
    return model.supports_static_decode


class Graphed:
    """`run()` recorded as a CUDA graph at the first call (after three warm-up calls on a side stream, as capture
    needs) and replayed at every call: -> the output tensor that each replay rewrites."""

    def __init__(self, run):
        self.run, self.graph, self.out = run, None, None

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.run()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.run()
        self.graph.replay()
        return self.out
