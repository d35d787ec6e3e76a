"""Projectors: vision features [N, T, ve_hidden_size] -> language-model embeddings [N, T, hidden_size].

`linear` is the MiniMind2-V projector (one Linear with bias; the seeds call its class `VisionEncoder`), `mlp` the
minimind-3v one (LayerNorm -> Linear -> GELU -> Linear). Parameter names match the original checkpoints
(`vision_proj.vision_proj.0.*`, `vision_proj.mlp.{0,1,3}.*`), so their state dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MiniMindVConfig


class VisionEncoder(nn.Module):
    """The linear projector, under the seeds' name: Linear(ve_hidden_size, hidden_size)."""

    def __init__(self, ve_hidden_size: int = 768, hidden_size: int = 512):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.Linear(ve_hidden_size, hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(features)


LinearProjector = VisionEncoder


class MLPProjector(nn.Module):
    """LayerNorm(ve) -> Linear(ve, hidden) -> GELU -> Linear(hidden, hidden)."""

    def __init__(self, ve_hidden_size: int = 768, hidden_size: int = 768):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(ve_hidden_size), nn.Linear(ve_hidden_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


PROJECTORS = {"linear": LinearProjector, "mlp": MLPProjector}


def build_projector(config: MiniMindVConfig) -> nn.Module:
    return PROJECTORS[config.projector_type](config.ve_hidden_size, config.hidden_size)
