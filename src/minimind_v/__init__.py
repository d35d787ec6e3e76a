"""minimind-v: train, evaluate, chat with and serve tiny vision-language models."""

from transformers import AutoConfig, AutoModelForCausalLM

from .config import PRESETS, MiniMindVConfig
from .models import MiniMindForCausalLM, MiniMindModel, MiniMindOutput, MiniMindVLM, VisionTower, load_vision_tower
from .models.compat import VisionEncoder, VLLMconfig, get_model_configs  # the seeds' names

__version__ = "0.1.0"

AutoConfig.register(MiniMindVConfig.model_type, MiniMindVConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindVConfig, MiniMindVLM, exist_ok=True)

__all__ = ["PRESETS", "MiniMindVConfig", "VLLMconfig", "get_model_configs", "MiniMindForCausalLM", "MiniMindModel",
           "MiniMindOutput", "MiniMindVLM", "VisionEncoder", "VisionTower", "load_vision_tower", "__version__"]
