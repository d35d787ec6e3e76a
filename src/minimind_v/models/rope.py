"""Rotary position embedding, rotate-half layout, with optional YaRN scaling for long inference.

cos/sin are computed from integer positions on the fly in fp32 (never stored as a buffer that `model.to(bf16)` would
round), so any `position_ids` work: left padding, KV-cache offsets, and per-sample positions of packed rows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import MiniMindVConfig

YARN_BETA_FAST, YARN_BETA_SLOW, YARN_ATTENTION_FACTOR = 32.0, 1.0, 1.0


def inverse_frequencies(config: MiniMindVConfig) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies [head_dim // 2] (on the CPU, even under a meta-device context) and the
    attention factor applied to cos/sin."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device="cpu")[: dim // 2].float() / dim))
    if not config.inference_rope_scaling:
        return inv_freq, 1.0
    orig_max, factor = config.yarn_original_max_position_embeddings, config.yarn_factor
    if config.max_position_embeddings / orig_max <= 1.0:
        return inv_freq, YARN_ATTENTION_FACTOR

    def pair_index(num_rotations: float) -> float:  # which frequency pair turns `num_rotations` times over orig_max
        return (dim * math.log(orig_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(pair_index(YARN_BETA_FAST)), 0)
    high = min(math.ceil(pair_index(YARN_BETA_SLOW)), dim // 2 - 1)
    ramp = torch.clamp((torch.arange(dim // 2, device="cpu").float() - low) / max(high - low, 0.001), 0, 1)
    return inv_freq * (1 - ramp + ramp / factor), YARN_ATTENTION_FACTOR


class RotaryEmbedding(nn.Module):
    def __init__(self, config: MiniMindVConfig):
        super().__init__()
        inv_freq, self.attention_factor = inverse_frequencies(config)
        self._inv_freq = {torch.device("cpu"): inv_freq}  # per device, fp32, deliberately not a buffer

    def _freqs_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> cos, sin [B, 1, L, head_dim] in `dtype` (broadcast over heads)."""
        angles = position_ids.float()[..., None] * self._freqs_on(position_ids.device)  # [B, L, D/2]
        angles = torch.cat([angles, angles], dim=-1)  # [B, L, D]
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        return cos[:, None].to(dtype), sin[:, None].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] rotated by cos/sin [B, 1, L, D]."""
    return x * cos + rotate_half(x) * sin
