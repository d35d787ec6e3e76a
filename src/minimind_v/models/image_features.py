"""The frozen tower's features of images, with an optional cache: what training, evaluation and generation read.

A frozen tower gives the same features for the same image every time, so `ImageFeatures` keys them by the image's
content (`bytes_key`: sha256 of its encoded bytes, the one place that key is computed) and by the tower
(`tower_id`), computes only what is missing, and can keep them on disk (`<dir>/<tower_id>.safetensors`, fp16) so
that later epochs, stages and runs skip the tower entirely - or in memory only, for an evaluation.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .vision_tower import VisionTower, image2tensor

logger = logging.getLogger(__name__)

# images a tower pass: on a CPU small chunks keep the activations in the caches (EfficientNet-Lite0 at 128 px on a
# 2-core CPU: 16 at a time 3-5 x the images/s of 256, the same features; a ViT-B/16 the same speed either way)
CPU_CHUNK = 16
GPU_CHUNK = 256


def tower_id(config, tower: VisionTower) -> str:
    """What identifies a tower's features: where it comes from, its kind, the tokens and width it gives (the
    tower's own count: a cross_attn projector's placeholder run says nothing about it) and its image processor."""
    text = (f"{config.vision_tower_path}|{config.vision_tower_kind}|{tower.num_tokens}|{tower.hidden_size}|"
            f"{type(tower.processor).__name__}")  # how images are prepared is part of what the features mean
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def bytes_key(data: bytes) -> str:
    """The cache key of an encoded image: sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def pixel_key(image: Image.Image) -> str:
    """A key for an image that has no encoded bytes at hand: its mode, size and pixels."""
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


class ImageFeatures:
    """images (+ content keys) -> tower features [N, T, D] on `device`, cached by key when a cache is enabled."""

    def __init__(self, tower: VisionTower, cache_dir: str | None = None, name: str = "tower",
                 batch_size: int | None = None, in_memory: bool = False):
        """`cache_dir`: keep the features there (and in memory); `in_memory`: keep them in memory only (an
        evaluation that asks several questions about each image runs the tower once per image); `batch_size`:
        images a tower pass (default: CPU_CHUNK on a CPU, GPU_CHUNK elsewhere)."""
        self.tower, self.batch_size = tower, batch_size
        self.path = os.path.join(cache_dir, f"{name}.safetensors") if cache_dir else None
        self.cache: dict[str, torch.Tensor] | None = {} if cache_dir is not None or in_memory else None
        self.dirty = False
        if self.path and os.path.isfile(self.path):
            try:
                self.cache = dict(load_file(self.path))
            except (SafetensorError, OSError, ValueError) as err:  # damaged: the features are computed again
                logger.warning("feature cache %s is damaged (%s): computing the features again", self.path, err)

    def __call__(self, images: list[Image.Image] | torch.Tensor, keys: list[str], device: torch.device) -> torch.Tensor:
        """images: PIL images, or the pixel values loader workers made (stacked [N, 3, H, W]) -> [N, T, D]."""
        if not len(images):
            return torch.empty(0, self.tower.num_tokens, self.tower.hidden_size, device=device)
        if self.cache is None:
            return self._encode(images).to(device)
        self.add(images, keys)
        with torch.autocast("cpu", enabled=False):  # gathering, not compute: CPU autocast refuses fp16 inputs
            stacked = torch.stack([self.cache[k] for k in keys])  # [N, T, D] fp16 on the CPU
        if device.type == "cuda":  # pinned: the copy does not make the host wait for the GPU
            stacked = stacked.pin_memory()
        return stacked.to(device, non_blocking=True).float()

    def add(self, images: list[Image.Image] | torch.Tensor, keys: list[str]) -> None:
        """Compute and keep the features of the images not cached yet (nothing without a cache). An evaluation
        adds all its images at once, so the tower sees full chunks, not the few new images of each batch of
        questions."""
        if self.cache is None:
            return
        missing = {k: img for k, img in zip(keys, images) if k not in self.cache}
        if any(img is None for img in missing.values()):
            raise ValueError("an image was left undecoded as cached, but its features are not in the cache")
        if missing:
            encoded = self._encode(list(missing.values())).to("cpu", torch.float16)
            self.cache.update(zip(missing, encoded))
            self.dirty = True

    def known_keys(self):
        """The keys whose features are cached (a live view; empty without a cache)."""
        return self.cache.keys() if self.cache is not None else frozenset()

    def _encode(self, images: list[Image.Image | torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """PIL images or pixel values ([3, H, W] each, or stacked) -> [N, T, D], in chunks of batch_size."""
        chunks, size = [], self.batch_size or self._chunk()
        for start in range(0, len(images), size):
            chunk = images[start:start + size]
            if isinstance(chunk, list):
                chunk = (torch.stack(chunk) if isinstance(chunk[0], torch.Tensor)
                         else torch.cat([image2tensor(img, self.tower.processor) for img in chunk]))
            chunks.append(self.tower(chunk).float())  # the tower moves and casts the pixels (workers' may be fp16)
        return torch.cat(chunks)

    def _chunk(self) -> int:
        """Images a tower pass where it runs: on a CPU a few at a time, whose activations stay in the caches."""
        weight = next(self.tower.parameters(), None)
        return CPU_CHUNK if weight is None or weight.device.type == "cpu" else GPU_CHUNK

    def save(self) -> None:
        """Write the cache to disk (atomically) if anything was added."""
        if self.path and self.dirty:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self.path + ".tmp"
            save_file({k: v.contiguous() for k, v in self.cache.items()}, tmp)
            os.replace(tmp, self.path)
            self.dirty = False
