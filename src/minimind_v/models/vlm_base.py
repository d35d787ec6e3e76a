"""What every VLM shares: `VisionLanguageModel`, the contract callers rely on instead of probing the class.

    pixel_values [B, N, 3, H, W] -> vision_tower -> [B*N, T, ve] -> vision_proj -> [B*N, T, hidden]
    input_ids [B, L] -> embed_tokens -> [B, L, hidden]; the placeholder positions (input_ids == image token id, T per
    image, in reading order) are overwritten with the image features, in order -> language model -> logits

Images are encoded at prefill only (never again once the KV cache holds them). By default the frozen vision tower is
not part of the saved checkpoint: `save_pretrained` leaves it out and `from_pretrained` reloads it from
`config.vision_tower_path`. After `embed_vision_tower()` (used by the self-contained export) its weights travel in the
checkpoint and `config.vision_config` describes it, as LLaVA-style Hugging Face models do.

Two VLMs implement it (`build_vlm` / `load_vlm` in models/__init__.py pick one from the config):
    MiniMindVLM      vlm.py: the MiniMind LM built from the config (the default); checkpoints hold every weight
    HFBackboneVLM    backbone.py: `config.llm_path`, any local causal LM; checkpoints hold only what was trained
                     (projector, `trained_llm_parts`, LoRA adapters) and the base path
Capabilities they answer: `supports_packing`, `supports_static_decode`, `supports_chunked_loss`,
`supports_int8_checkpoints`, `language_model`,
`decoder_layers()`, `trainable_modules(strategy)`, `frozen_base_parameters()`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..config import MiniMindVConfig
from .lora import add_lora, merge_lora
from .safe_loading import check_finite
from .efficientnet import PACKAGED_TOWERS
from .vision_tower import VisionTower, load_vision_tower, vision_tower_from_config

logger = logging.getLogger(__name__)
FROM_CONFIG = "<from config>"  # vision_model_path default: the tower the config names
TOWER_PREFIX = "vision_tower."


def optional_tower(path: str, kind: str = "auto", num_tokens: int | None = None) -> VisionTower | None:
    """The tower of a local folder (or EfficientNet-Lite0); None with a warning when the folder does not exist, as
    the original does (nothing is downloaded)."""
    if path in PACKAGED_TOWERS or kind == "efficientnet":
        return load_vision_tower(path, kind, num_tokens)
    if not os.path.isdir(path):
        logger.warning("vision tower %r is not a local folder: the model has no vision tower and cannot take "
                       "images (nothing is downloaded; pass a local CLIP/SigLIP folder)", path)
        return None
    return load_vision_tower(path, kind)


class VisionLanguageModel:
    """What every VLM shares, and the contract callers rely on instead of probing the class: the frozen tower, the
    projector, image features spliced into the embeddings, LoRA on the language model, checkpoints
    (`checkpoint_state_dict` / `load_checkpoint_state`), and the capabilities below."""

    config: MiniMindVConfig
    vision_proj: nn.Module
    vision_tower: VisionTower | None
    language_model: nn.Module  # the language model without the vision parts (what LoRA adapters go into)
    decoder_layers: Callable[[], nn.ModuleList]  # its decoder layers (what the freeze strategies count)
    supports_packing = False  # several samples in one row (segment ids, per-sample positions)
    supports_original_layout = False  # saves as an original MiniMind-V .pth and the remote-code export
    supports_chunked_loss = False  # forward(...).hidden_states are the final normed states get_output_embeddings reads
    supports_int8_checkpoints = False  # saves and loads int8 decoder layers (config.int8_weights, models/quantize.py)

    def _init_vision(self, config: MiniMindVConfig, vision_model_path: str | None) -> None:
        self.vision_tower = None
        if config.vision_config is not None:  # an embedded tower: built here, weights loaded with the checkpoint
            self.attach_vision_tower(vision_tower_from_config(config.vision_config))
            return
        path = config.vision_tower_path if vision_model_path == FROM_CONFIG else vision_model_path
        tower = optional_tower(path, config.vision_tower_kind, config.tower_tokens or 49) if path else None
        if tower is not None:
            self.attach_vision_tower(tower, path)

    @property
    def multi_modal_projector(self) -> nn.Module:
        """The projector, under Hugging Face's name (the attribute keeps the original checkpoints' key)."""
        return self.vision_proj

    @property
    def processor(self) -> object | None:
        return self.vision_tower.processor if self.vision_tower is not None else None

    def attach_vision_tower(self, tower: VisionTower, path: str | None = None) -> None:
        """Install a frozen tower after checking it fits the config (feature width and tokens per image)."""
        if tower.hidden_size != self.config.ve_hidden_size:
            raise ValueError(f"vision tower features are {tower.hidden_size} wide but config.ve_hidden_size is "
                             f"{self.config.ve_hidden_size}")
        expected = self.config.tower_tokens
        if expected is not None and tower.num_tokens != expected:
            what = "vision_tokens" if self.config.vision_tokens is not None else "the placeholder run (image_token_len)"
            raise ValueError(f"vision tower gives {tower.num_tokens} tokens per image but {what} is {expected}")
        self.vision_tower = tower.to(next(self.vision_proj.parameters()).device)
        if path is not None:
            self.config.vision_tower_path = path if path in PACKAGED_TOWERS else os.path.abspath(path)

    def _attach_tower_folder(self, path: str | None, source: object) -> None:
        """The tower a loaded checkpoint names (a missing folder is an error, not a text-only model)."""
        if not path:
            return
        if not os.path.isdir(path) and path not in PACKAGED_TOWERS:
            raise FileNotFoundError(f"{source}: vision tower folder {path!r} not found; pass "
                                    "vision_model_path=<local folder> (or None for a text-only model)")
        self.attach_vision_tower(load_vision_tower(path, self.config.vision_tower_kind,
                                                   self.config.tower_tokens or 49), path)
        self.vision_tower.to(self.vision_proj_dtype)

    # --- images into the embeddings ---
    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None,
                     image_features: torch.Tensor | None, past_key_values: Cache | None) -> torch.Tensor:
        """input_ids [B, L] -> embeddings [B, L, H], image features over the placeholders (at prefill only)."""
        inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, L, H]
        past_len = past_key_values.get_seq_length() if isinstance(past_key_values, Cache) else 0
        if past_len == 0 and (pixel_values is not None or image_features is not None):
            projected = (self.encode_images(pixel_values) if image_features is None
                         else self.vision_proj(image_features.to(self.vision_proj_dtype)))
            inputs_embeds = merge_image_features(inputs_embeds, input_ids, projected, self.config.image_token_id)
        return inputs_embeds

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
        features = self.vision_tower(pixel_values)  # [N, T, ve]
        return self.vision_proj(features.to(self.vision_proj_dtype))  # [N, T, hidden]

    @property
    def vision_proj_dtype(self) -> torch.dtype:
        return next(self.vision_proj.parameters()).dtype

    def embed_vision_tower(self) -> None:
        """Make checkpoints self-contained: the tower's weights and config are saved with the model from now on."""
        if self.vision_tower is None or not hasattr(self.vision_tower.encoder, "config"):
            raise ValueError("only a Hugging Face CLIP/SigLIP vision tower can be embedded in a checkpoint")
        self.config.vision_config = self.vision_tower.encoder.config.to_dict()
        self.config.vision_tower_path = None

    # --- the language model: its layers, what trains, LoRA, what was trained ---
    def checkpoint_activations(self) -> None:
        """Recompute activations in the backward pass (transformers' activation checkpointing; named
        gradient_checkpointing before transformers 5.23)."""
        enable = getattr(super(), "activation_checkpointing_enable", None) or super().gradient_checkpointing_enable
        enable()

    @property
    def supports_static_decode(self) -> bool:
        """Whether decode steps can run as one fixed-shape step (CUDA graphs, compiled CPU steps)."""
        return False

    def whole_language_model(self) -> list[nn.Module]:
        """The modules that hold every language-model weight (freeze strategy 0 trains them)."""
        return [self.language_model]

    def trainable_modules(self, strategy: int) -> list[nn.Module]:
        """What a freeze strategy trains besides the projector: 0 the whole language model, 1 its first and last
        decoder layers, 2 nothing."""
        if strategy not in (0, 1, 2):
            raise ValueError(f"freeze strategy must be 0, 1 or 2, got {strategy}")
        layers = self.decoder_layers()
        return {0: self.whole_language_model(), 1: [layers[0], layers[-1]], 2: []}[strategy]

    def export_language_model(self, folder: str, tokenizer_dir: str | None = None) -> None:
        """For a standalone export: write what the checkpoint refers to outside itself into `folder` (nothing, when
        the checkpoint holds every weight)."""

    def frozen_base_parameters(self) -> list[nn.Parameter]:
        """Frozen weights a checkpoint never holds (a Hugging Face backbone's base): they may be held in a lower
        precision while training."""
        return []

    def enable_lora(self, rank: int, alpha: float | None = None, dropout: float | None = None,
                    targets: list[str] | None = None) -> None:
        """Add LoRA adapters to a model that has none (recorded in the config, so checkpoints reload them)."""
        if self.config.lora_rank:
            raise ValueError(f"the model already has LoRA adapters (rank {self.config.lora_rank})")
        for name, value in (("lora_alpha", alpha), ("lora_dropout", dropout), ("lora_targets", targets)):
            if value is not None:
                setattr(self.config, name, value)
        self.config.lora_rank = rank
        add_lora(self.language_model, self.config)

    def merge_lora(self) -> None:
        """Fold the adapters into the weights they adapt (for export); the model has no adapters afterwards."""
        if self.config.lora_rank:
            merge_lora(self.language_model)
            if self.config.llm_path:  # the merged weights now differ from the base: every adapted layer is saved
                self.mark_trained(list(self.decoder_layers()))
            self.config.lora_rank = 0

    def mark_trained(self, modules: list[nn.Module]) -> None:
        """Record that these language-model modules move away from the base weights (HF backbones save them)."""
        if not self.config.llm_path:
            return
        names = {id(m): name for name, m in self.named_modules()}
        self.config.trained_llm_parts = sorted(set(self.config.trained_llm_parts) |
                                               {names[id(m)] + "." for m in modules})

    def saves(self, key: str) -> bool:
        """Whether a checkpoint holds this state-dict key."""
        if key.startswith(TOWER_PREFIX):
            return self.config.vision_config is not None
        return True

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds (tied weights once)."""
        seen, state = set(), {}
        for key, value in self.state_dict().items():
            if self.saves(key) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                state[key] = value
        return state

    def load_checkpoint_state(self, weights: dict[str, torch.Tensor], source: object) -> None:
        """Strict: exactly the keys `checkpoint_state_dict` names, with the same shapes."""
        own = self.checkpoint_state_dict()
        wrong = [f"{k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(weights))
                 if weights[k].shape != own[k].shape]
        groups = {"missing": sorted(set(own) - set(weights)), "unexpected": sorted(set(weights) - set(own)),
                  "shape-mismatched": wrong}
        if any(groups.values()):
            raise key_mismatch_error(source, groups)
        check_finite(weights.items(), source)
        with torch.no_grad():
            for key, value in weights.items():
                own[key].copy_(value)


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
    The k-th placeholder takes feature row k, as `masked_scatter` does, but through the placeholders' positions
    (`nonzero_static`: the count is known) and `index_copy`, so neither direction makes the host wait for the GPU
    (masked_scatter's backward runs masked_select, which does).
    """
    mask = input_ids == image_token_id  # [B, L]
    if not torch.compiler.is_compiling() and int(mask.sum()) != features.shape[0] * features.shape[1]:
        num_slots, num_features = int(mask.sum()), features.shape[0] * features.shape[1]
        raise ValueError(f"input_ids hold {num_slots} image placeholder tokens (id {image_token_id}) but the "
                         f"{features.shape[0]} image(s) give {num_features} features ({features.shape[1]} each); "
                         "every image needs one complete placeholder run (was the prompt truncated?)")
    if features.shape[0] == 0:
        return embeds
    rows = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # [N * T, H]
    slots = torch.nonzero_static(mask.flatten(), size=rows.shape[0]).squeeze(1)  # [N * T] flat placeholder positions
    return embeds.flatten(0, 1).index_copy(0, slots, rows).view_as(embeds)  # [B, L, H]
