"""MiniMind-V: frozen vision tower -> projector -> MiniMind language model.

    pixel_values [B, N, 3, H, W] -> vision_tower -> [B*N, T, ve] -> vision_proj -> [B*N, T, hidden]
    input_ids [B, L] -> embed_tokens -> [B, L, hidden]; the placeholder positions (input_ids == image token id, T per
    image, in reading order) are overwritten with the image features by `masked_scatter` -> language model -> logits

Images are encoded at prefill only (never again once the KV cache holds them). By default the frozen vision tower is
not part of the saved checkpoint: `save_pretrained` leaves it out and `from_pretrained` reloads it from
`config.vision_tower_path`. After `embed_vision_tower()` (used by the self-contained export) its weights travel in the
checkpoint and `config.vision_config` describes it, as LLaVA-style Hugging Face models do.
"""

from __future__ import annotations

import logging
import os

import torch
from PIL import Image
from transformers.cache_utils import Cache

from ..config import MiniMindVConfig
from .language_model import MiniMindForCausalLM, MiniMindOutput
from .projector import build_projector
from .vision_tower import (EFFICIENTNET, VisionTower, image2tensor, load_image_processor, load_vision_tower,
                           vision_tower_from_config)

logger = logging.getLogger(__name__)
_FROM_CONFIG = "<from config>"
TOWER_PREFIX = "vision_tower."


class MiniMindVLM(MiniMindForCausalLM):
    """`MiniMindVLM(params=config, vision_model_path=...)` as in the seeds, or `MiniMindVLM(config)` as in HF."""

    def __init__(self, config: MiniMindVConfig | None = None, vision_model_path: str | None = _FROM_CONFIG, *,
                 params: MiniMindVConfig | None = None):
        if (config is None) == (params is None):
            raise ValueError("pass the config once, as `config` or as the seeds' `params`")
        config = config if config is not None else params
        super().__init__(config)
        self.vision_proj = build_projector(config)
        self.post_init()
        self.vision_tower: VisionTower | None = None
        if config.vision_config is not None:  # an embedded tower: built here, weights loaded with the checkpoint
            self.attach_vision_tower(vision_tower_from_config(config.vision_config))
            return
        path = config.vision_tower_path if vision_model_path == _FROM_CONFIG else vision_model_path
        tower, _ = (self.get_vision_model(path, config.vision_tower_kind, config.tower_tokens or 49) if path
                    else (None, None))
        if tower is not None:
            self.attach_vision_tower(tower, path)

    # --- the seeds' names ---
    @property
    def vision_encoder(self) -> VisionTower | None:
        return self.vision_tower

    @property
    def multi_modal_projector(self) -> torch.nn.Module:
        return self.vision_proj

    @property
    def processor(self) -> object | None:
        return self.vision_tower.processor if self.vision_tower is not None else None

    @staticmethod
    def get_vision_model(model_path: str, kind: str = "auto",
                         num_tokens: int | None = None) -> tuple[VisionTower | None, object | None]:
        """(tower, processor) from a local folder; (None, None) with a warning when the folder does not exist."""
        if model_path == EFFICIENTNET or kind == "efficientnet":
            tower = load_vision_tower(model_path, kind, num_tokens)
            return tower, tower.processor
        if not os.path.isdir(model_path):
            logger.warning("vision tower %r is not a local folder: the model has no vision tower and cannot take "
                           "images (nothing is downloaded; pass a local CLIP/SigLIP folder)", model_path)
            return None, None
        tower = load_vision_tower(model_path, kind)
        return tower, tower.processor

    @staticmethod
    def image2tensor(image: Image.Image, processor: object) -> torch.Tensor:
        """PIL image of any mode -> pixel values [1, 3, H, W]."""
        return image2tensor(image, processor)

    @staticmethod
    def get_image_embeddings(image_tensors: torch.Tensor, vision_model: VisionTower) -> torch.Tensor:
        """pixels [N, 3, H, W] -> frozen tower features [N, T, ve_hidden_size]."""
        return vision_model(image_tensors)

    def attach_vision_tower(self, tower: VisionTower, path: str | None = None) -> None:
        """Install a frozen tower after checking it fits the config (feature width and tokens per image)."""
        if tower.hidden_size != self.config.ve_hidden_size:
            raise ValueError(f"vision tower features are {tower.hidden_size} wide but config.ve_hidden_size is "
                             f"{self.config.ve_hidden_size}")
        expected = self.config.tower_tokens
        if expected is not None and tower.num_tokens != expected:
            what = "vision_tokens" if self.config.vision_tokens is not None else "the placeholder run (image_token_len)"
            raise ValueError(f"vision tower gives {tower.num_tokens} tokens per image but {what} is {expected}")
        weight = self.lm_head.weight
        self.vision_tower = tower.to(weight.device)
        if path is not None:
            self.config.vision_tower_path = path if path == EFFICIENTNET else os.path.abspath(path)

    # --- forward ---
    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                labels: torch.LongTensor | None = None, position_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                **kwargs) -> MiniMindOutput:
        """image_features [num_images, T, ve]: the tower's output, precomputed (e.g. from a feature cache), used
        instead of pixel_values."""
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.model.embed_tokens(input_ids)  # [B, L, H]
            past_len = past_key_values.get_seq_length() if isinstance(past_key_values, Cache) else 0
            if past_len == 0 and (pixel_values is not None or image_features is not None):  # images at prefill
                projected = (self.encode_images(pixel_values) if image_features is None
                             else self.vision_proj(image_features.to(self.vision_proj_dtype)))
                inputs_embeds = merge_image_features(inputs_embeds, input_ids, projected, self.config.image_token_id)
        hidden, cache, aux_loss = self.model(None, attention_mask, position_ids, past_key_values, inputs_embeds,
                                             use_cache)
        return self._head(hidden, cache, aux_loss, labels, logits_to_keep)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, N, 3, H, W] (or [num_images, 3, H, W], images in reading order) -> [B*N, T, hidden]."""
        if self.vision_tower is None:
            raise ValueError("pixel_values were given but the model has no vision tower (build it with "
                             "vision_model_path=<local CLIP/SigLIP folder> or set config.vision_tower_path)")
        if pixel_values.dim() == 6 and pixel_values.shape[2] == 1:  # [B, N, 1, 3, H, W], as the original accepts
            pixel_values = pixel_values.squeeze(2)
        if pixel_values.dim() == 5:
            pixel_values = pixel_values.flatten(0, 1)  # [B*N, 3, H, W]
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [batch, images, 3, H, W], got {list(pixel_values.shape)}")
        features = self.get_image_embeddings(pixel_values, self.vision_tower)  # [N, T, ve]
        return self.vision_proj(features.to(self.vision_proj_dtype))  # [N, T, hidden]

    @property
    def vision_proj_dtype(self) -> torch.dtype:
        return next(self.vision_proj.parameters()).dtype

    # --- Hugging Face save / load: the frozen tower is reloaded from its folder unless it is embedded ---
    def state_dict_without_tower(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(TOWER_PREFIX)}

    def embed_vision_tower(self) -> None:
        """Make checkpoints self-contained: the tower's weights and config are saved with the model from now on."""
        if self.vision_tower is None or not hasattr(self.vision_tower.encoder, "config"):
            raise ValueError("only a Hugging Face CLIP/SigLIP vision tower can be embedded in a checkpoint")
        self.config.vision_config = self.vision_tower.encoder.config.to_dict()
        self.config.vision_tower_path = None

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        embedded = self.config.vision_config is not None
        kwargs.setdefault("state_dict", self.state_dict() if embedded else self.state_dict_without_tower())
        super().save_pretrained(save_directory, *args, **kwargs)
        if embedded and self.processor is not None:
            self.processor.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args,
                        vision_model_path: str | None = _FROM_CONFIG, **kwargs) -> "MiniMindVLM":
        """Strict load: any missing, unexpected or mismatched weight is an error naming the keys."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, vision_model_path=None,
                                              output_loading_info=True, **kwargs)
        check_loading_info(info, pretrained_model_name_or_path)
        if model.config.vision_config is not None:  # embedded tower: loaded above; its processor sits beside it
            model.vision_tower.processor = load_image_processor(pretrained_model_name_or_path)
            return (model, info) if want_info else model
        path = model.config.vision_tower_path if vision_model_path == _FROM_CONFIG else vision_model_path
        if path:
            if not os.path.isdir(path) and path != EFFICIENTNET:
                raise FileNotFoundError(f"{pretrained_model_name_or_path}: vision tower folder {path!r} not found; "
                                        "pass vision_model_path=<local folder> (or None for a text-only model)")
            model.attach_vision_tower(load_vision_tower(path, model.config.vision_tower_kind,
                                                        model.config.tower_tokens or 49), path)
            model.vision_tower.to(model.dtype)
        return (model, info) if want_info else model


def check_loading_info(info: dict, source: object) -> None:
    groups = {name: sorted(str(k) for k in info.get(f"{name}_keys", ())) for name in
              ("missing", "unexpected", "mismatched")}
    if any(groups.values()):
        raise key_mismatch_error(source, groups)


def key_mismatch_error(source: object, groups: dict[str, list[str]]) -> ValueError:
    """One message for every strict load: each non-empty group of offending keys, named."""
    return ValueError(f"checkpoint {source} does not match the model: " +
                      "; ".join(f"{name} keys: {keys}" for name, keys in groups.items() if keys))


def merge_image_features(embeds: torch.Tensor, input_ids: torch.LongTensor, features: torch.Tensor,
                         image_token_id: int) -> torch.Tensor:
    """Write image features over the placeholder embeddings.

    embeds [B, L, H], input_ids [B, L], features [N, T, H] -> [B, L, H]. The placeholders, read row by row, must be
    exactly N * T; otherwise (a missing image, an extra one, or a placeholder run cut by truncation) ValueError.
    """
    mask = input_ids == image_token_id  # [B, L]
    num_slots, num_features = int(mask.sum()), features.shape[0] * features.shape[1]
    if num_slots != num_features:
        raise ValueError(f"input_ids hold {num_slots} image placeholder tokens (id {image_token_id}) but the "
                         f"{features.shape[0]} image(s) give {num_features} features ({features.shape[1]} each); "
                         "every image needs one complete placeholder run (was the prompt truncated?)")
    return embeds.masked_scatter(mask[..., None].expand_as(embeds), features.to(embeds.dtype))
