"""The seeds' names, in one place: what the seed documents call things, on top of the core's own vocabulary
(vision_tower / multi_modal_projector / language_model). State-dict keys are the same either way.

    VLLMconfig                  MiniMindVConfig
    get_model_configs()         the seeds' presets: tiny, small, medium, large_moe
    VisionEncoder               the linear projector (LinearProjector)
    model.params                model.config
    model.vision_encoder        model.vision_tower
    MiniMindVLM.get_vision_model(path) / .image2tensor(image, processor) / .get_image_embeddings(pixels, tower)
    MiniMindVLM(params=config, ...)      the seeds' keyword (accepted by MiniMindVLM itself)
"""

from __future__ import annotations

import torch
from PIL import Image

from ..config import MiniMindVConfig
from .projector import LinearProjector
from .vision_tower import VisionTower, image2tensor
from .vlm_base import optional_tower

VLLMconfig = MiniMindVConfig


def get_model_configs() -> dict[str, MiniMindVConfig]:
    """The seeds' preset configs: tiny, small, medium, large_moe."""
    return {name: MiniMindVConfig.from_name(name) for name in ("tiny", "small", "medium", "large_moe")}


VisionEncoder = LinearProjector  # the linear projector: `VisionEncoder(ve_hidden_size, hidden_size)`


class SeedNames:
    """The seeds' attribute and method names on a VLM."""

    @property
    def params(self) -> MiniMindVConfig:
        """The config."""
        return self.config

    @property
    def vision_encoder(self) -> VisionTower | None:
        """The frozen vision tower."""
        return self.vision_tower

    @staticmethod
    def get_vision_model(model_path: str, kind: str = "auto",
                         num_tokens: int | None = None) -> tuple[VisionTower | None, object | None]:
        """(tower, processor) from a local folder; (None, None) with a warning when the folder does not exist."""
        tower = optional_tower(model_path, kind, num_tokens)
        return (tower, tower.processor) if tower is not None else (None, None)

    @staticmethod
    def image2tensor(image: Image.Image, processor: object) -> torch.Tensor:
        """PIL image of any mode -> pixel values [1, 3, H, W]."""
        return image2tensor(image, processor)

    @staticmethod
    def get_image_embeddings(image_tensors: torch.Tensor, vision_model: VisionTower) -> torch.Tensor:
        """pixels [N, 3, H, W] -> frozen tower features [N, T, ve_hidden_size]."""
        return vision_model(image_tensors)
