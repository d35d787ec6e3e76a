"""MiniMindVLM: the VLM on the MiniMind language model built from the config (the default; checkpoints hold every
weight, with the original MiniMind-V's state-dict keys). What it shares with every VLM is in vlm_base.py; the seeds'
names it answers to are in compat.py.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..config import MiniMindVConfig
from .compat import SeedNames
from .language_model import MiniMindForCausalLM, MiniMindOutput
from .lora import add_lora
from .projector import build_projector
from .quantize import quantize_int8
from .safe_loading import check_finite, check_shapes, meta_shapes, read_config, weight_files, weight_shapes
from .vision_tower import load_image_processor
from .vlm_base import FROM_CONFIG, TOWER_PREFIX, VisionLanguageModel, check_loading_info


class MiniMindVLM(SeedNames, VisionLanguageModel, MiniMindForCausalLM):
    """`MiniMindVLM(config)` as in Hugging Face, or `MiniMindVLM(params=config, vision_model_path=...)` as in the
    seeds (compat.py)."""

    supports_packing = True
    supports_chunked_loss = True
    supports_original_layout = True
    supports_int8_checkpoints = True

    def __init__(self, config: MiniMindVConfig | None = None, vision_model_path: str | None = FROM_CONFIG, *,
                 params: MiniMindVConfig | None = None):
        if (config is None) == (params is None):
            raise ValueError("pass the config once, as `config` or as the seeds' `params`")
        config = config if config is not None else params
        if config.llm_path:
            raise ValueError("this config names a Hugging Face language model (llm_path): build it with "
                             "build_vlm(config) / HFBackboneVLM")
        super().__init__(config)
        self.vision_proj = build_projector(config)
        self.post_init()
        if config.lora_rank:
            add_lora(self.model, config)
        if config.int8_weights:  # an int8 checkpoint: its layers take the int8 weights and scales it holds
            quantize_int8(self)
        self._init_vision(config, vision_model_path)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def language_model(self) -> nn.Module:
        """The decoder (embeddings, layers, final norm); the head `lm_head` is tied to its embeddings by default."""
        return self.model

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def whole_language_model(self) -> list[nn.Module]:
        return [self.model, self.lm_head]

    @property
    def supports_static_decode(self) -> bool:
        """Dense MiniMind models decode through one fixed-shape step (MoE routing is data-dependent)."""
        return not self.config.use_moe

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                labels: torch.LongTensor | None = None, position_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                **kwargs) -> MiniMindOutput:
        """image_features [num_images, T, ve]: the tower's output, precomputed (e.g. from a feature cache), used
        instead of pixel_values."""
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_features, past_key_values)
        hidden, cache, aux_loss = self.model(None, attention_mask, position_ids, past_key_values, inputs_embeds,
                                             use_cache)
        return self._head(hidden, cache, aux_loss, labels, logits_to_keep)

    # --- Hugging Face save / load: the frozen tower is reloaded from its folder unless it is embedded ---
    def state_dict_without_tower(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(TOWER_PREFIX)}

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        embedded = self.config.vision_config is not None
        kwargs.setdefault("state_dict", self.state_dict() if embedded else self.state_dict_without_tower())
        super().save_pretrained(save_directory, *args, **kwargs)
        if embedded and self.processor is not None:
            self.processor.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args,
                        vision_model_path: str | None = FROM_CONFIG, **kwargs) -> "MiniMindVLM":
        """Strict load: any missing, unexpected or mismatched weight is an error naming the keys. A local folder's
        config and weight headers are checked against each other before anything is allocated, and the loaded
        weights must be finite."""
        want_info = kwargs.pop("output_loading_info", False)
        folder = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(folder):
            config = read_config(folder)
            check_shapes(meta_shapes(lambda: cls(config, vision_model_path=None), folder),
                         weight_shapes(weight_files(folder)), folder)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, vision_model_path=None,
                                              output_loading_info=True, **kwargs)
        check_loading_info(info, pretrained_model_name_or_path)
        if model.config.vision_config is not None:  # embedded tower: loaded above; its processor sits beside it
            model.vision_tower.processor = load_image_processor(pretrained_model_name_or_path)
        else:
            model._attach_tower_folder(model.config.vision_tower_path if vision_model_path == FROM_CONFIG
                                       else vision_model_path, pretrained_model_name_or_path)
        check_finite([*model.named_parameters(), *model.named_buffers()], folder)
        return (model, info) if want_info else model
