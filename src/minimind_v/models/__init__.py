"""The architecture, one box per file: vision_tower -> projector -> language_model (attention, mlp, rope, norm) -> vlm;
or any Hugging Face causal LM as the language model (backbone), with optional LoRA adapters (lora)."""

from .language_model import MiniMindForCausalLM, MiniMindModel, MiniMindOutput
from .projector import LinearProjector, MLPProjector, VisionEncoder, build_projector
from .vision_tower import VisionTower, image2tensor, load_vision_tower, to_rgb
from .vlm import MiniMindVLM, build_vlm, load_vlm, merge_image_features
from .backbone import HFBackboneVLM

__all__ = ["MiniMindForCausalLM", "MiniMindModel", "MiniMindOutput", "LinearProjector", "MLPProjector",
           "VisionEncoder", "build_projector", "VisionTower", "image2tensor", "load_vision_tower", "to_rgb",
           "MiniMindVLM", "HFBackboneVLM", "build_vlm", "load_vlm", "merge_image_features"]
