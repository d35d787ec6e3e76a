"""minimind-v: train, evaluate, chat with and serve tiny vision-language models.

The names below load on first use (the console script starts without importing torch); using any of them also
registers the model type with transformers' AutoConfig and AutoModelForCausalLM (models/__init__.py).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {"PRESETS": "config", "MiniMindVConfig": "config", "MiniMindForCausalLM": "models",
            "MiniMindModel": "models", "MiniMindOutput": "models", "MiniMindVLM": "models", "VisionTower": "models",
            "load_vision_tower": "models", "VisionEncoder": "models.compat", "VLLMconfig": "models.compat",
            "get_model_configs": "models.compat"}  # the last three: the seeds' names
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minimind_v' has no attribute {name!r}")
    importlib.import_module(".models", __name__)  # the model classes, registered with the Auto classes
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
