"""A KV cache allocated once for the whole generation, as a transformers `Cache`.

transformers' DynamicCache concatenates every new key/value onto the old ones (a fresh allocation and a copy of the
whole cache per token); this one writes each step into buffers sized for prompt + max_new_tokens and hands attention
a view of the filled part, so the model code needs no change and decoding allocates nothing per token.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PreallocatedLayer(CacheLayerMixin):
    """One layer's keys and values: [B, Hkv, max_len, D] buffers, the first `length` positions filled."""

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len, self.length = max_len, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.keys = key_states.new_zeros(batch, heads, self.max_len, dim)
        self.values = value_states.new_zeros(batch, heads, self.max_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} were asked for")
        self.keys[:, :, self.length:end] = key_states  # [B, Hkv, L, D] written in place
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # views [B, Hkv, end, D]

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.length = 0


class PreallocatedCache(Cache):
    """`num_layers` preallocated layers of `max_len` positions (buffers are created at the first update)."""

    def __init__(self, num_layers: int, max_len: int):
        super().__init__(layers=[PreallocatedLayer(max_len) for _ in range(num_layers)])
