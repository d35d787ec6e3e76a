"""The architecture, one box per file:

    vision_tower -> projector -> language_model (attention, mlp, rope, norm) -> vlm_base (what every VLM shares)
    vlm: MiniMindVLM on MiniMind; backbone: HFBackboneVLM on any Hugging Face causal LM; lora: adapters on either
    image_features: the tower's features, cached; safe_loading: checks on checkpoints; compat: the seeds' names

`build_vlm(config)` and `load_vlm(folder)` pick the VLM class a config asks for. Importing this package registers
the model type with transformers' AutoConfig and AutoModelForCausalLM.
"""

from __future__ import annotations

import os

from transformers import AutoConfig, AutoModelForCausalLM

from ..config import MiniMindVConfig
from .backbone import HFBackboneVLM
from .compat import VisionEncoder
from .language_model import MiniMindForCausalLM, MiniMindModel, MiniMindOutput
from .projector import LinearProjector, MLPProjector, build_projector
from .safe_loading import read_config
from .vision_tower import VisionTower, image2tensor, load_vision_tower, to_rgb
from .vlm import MiniMindVLM
from .vlm_base import FROM_CONFIG, VisionLanguageModel, merge_image_features

AutoConfig.register(MiniMindVConfig.model_type, MiniMindVConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindVConfig, MiniMindVLM, exist_ok=True)

__all__ = ["MiniMindForCausalLM", "MiniMindModel", "MiniMindOutput", "LinearProjector", "MLPProjector",
           "VisionEncoder", "build_projector", "VisionTower", "image2tensor", "load_vision_tower", "to_rgb",
           "VisionLanguageModel", "MiniMindVLM", "HFBackboneVLM", "build_vlm", "load_vlm", "merge_image_features"]


def build_vlm(config: MiniMindVConfig, vision_model_path: str | None = FROM_CONFIG):
    """A fresh VLM of the class the config asks for."""
    cls = HFBackboneVLM if config.llm_path else MiniMindVLM
    return cls(config, vision_model_path=vision_model_path)


def load_vlm(folder: str | os.PathLike, vision_model_path: str | None = FROM_CONFIG):
    """A VLM folder written by `save_pretrained`, whichever language model it has."""
    cls = HFBackboneVLM if read_config(folder).llm_path else MiniMindVLM
    return cls.from_pretrained(folder, vision_model_path=vision_model_path)
