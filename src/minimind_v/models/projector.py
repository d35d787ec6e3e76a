"""Projectors: vision features [N, T, ve_hidden_size] -> language-model embeddings [N, T, hidden_size].

`linear` is the MiniMind2-V projector (one Linear with bias; the seeds call its class `VisionEncoder`, compat.py), `mlp` the
minimind-3v one (LayerNorm -> Linear -> GELU -> Linear); `cross_attn` resamples any number of tower tokens into
`image_token_len` learned queries. Parameter names of the first two match the original checkpoints
(`vision_proj.vision_proj.0.*`, `vision_proj.mlp.{0,1,3}.*`), so their state dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MiniMindVConfig


class LinearProjector(nn.Module):
    """Linear(ve_hidden_size, hidden_size)."""

    def __init__(self, ve_hidden_size: int = 768, hidden_size: int = 512):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.Linear(ve_hidden_size, hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(features)


class MLPProjector(nn.Module):
    """LayerNorm(ve) -> Linear(ve, hidden) -> GELU -> Linear(hidden, hidden)."""

    def __init__(self, ve_hidden_size: int = 768, hidden_size: int = 768):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(ve_hidden_size), nn.Linear(ve_hidden_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: queries attend to the image tokens (residual), then an MLP (residual)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.query_norm, self.context_norm = nn.LayerNorm(hidden_size), nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(),
                                 nn.Linear(4 * hidden_size, hidden_size))

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = self.context_norm(context)  # [N, T, H]
        attended, _ = self.attn(self.query_norm(queries), context, context, need_weights=False)  # [N, Q, H]
        queries = queries + attended
        return queries + self.mlp(self.mlp_norm(queries))  # [N, Q, H]


class CrossAttnProjector(nn.Module):
    """`num_queries` learned queries read each image's T tower tokens through `num_layers` cross-attention blocks:
    [N, T, ve] -> [N, num_queries, hidden]. T may differ from num_queries (a resampler, as in seed 002's idea);
    images never attend to each other, so a batch equals its images one at a time."""

    def __init__(self, ve_hidden_size: int, hidden_size: int, num_queries: int, num_layers: int = 2,
                 num_heads: int = 8):
        super().__init__()
        self.input_proj = nn.Sequential(nn.LayerNorm(ve_hidden_size), nn.Linear(ve_hidden_size, hidden_size))
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_size) * 0.02)  # [Q, H]
        self.blocks = nn.ModuleList(CrossAttentionBlock(hidden_size, num_heads) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        context = self.input_proj(features)  # [N, T, H]
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)  # [N, Q, H]
        for block in self.blocks:
            queries = block(queries, context)
        return self.out_norm(queries)  # [N, Q, H]


PROJECTORS = {"linear": LinearProjector, "mlp": MLPProjector, "cross_attn": CrossAttnProjector}


def build_projector(config: MiniMindVConfig) -> nn.Module:
    if config.projector_type == "cross_attn":
        return CrossAttnProjector(config.ve_hidden_size, config.hidden_size, config.image_token_len,
                                  config.projector_layers, config.projector_heads)
    return PROJECTORS[config.projector_type](config.ve_hidden_size, config.hidden_size)
