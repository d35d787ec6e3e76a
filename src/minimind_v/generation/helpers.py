"""The usage guide's two helper functions, on top of the engine (the guide's versions read a global tokenizer;
these take it as an argument).

    multimodal_generate(model, tokenizer, "this picture shows", image, max_length=50, temperature=0.7, top_k=40)
    batch_multimodal_inference(model, tokenizer, ["describe:", "what is this:"], [image_a, image_b])
"""

from __future__ import annotations

import torch
from PIL import Image

from ..config import IMAGE_MARKER
from .engine import Engine, GenerationRequest
from .sampling import SamplingParams


def multimodal_generate(model, tokenizer, text_prompt: str, image: Image.Image, max_length: int = 100,
                        temperature: float = 1.0, top_k: int = 50, top_p: float = 0.9,
                        seed: int | None = None) -> str:
    """Sample a continuation of `text_prompt` followed by the image (raw text, no chat template), stopping at
    EOS or after `max_length` tokens, as the guide's loop does (KV cache, image at prefill only)."""
    params = SamplingParams(max_new_tokens=max_length, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    request = GenerationRequest(text=text_prompt + IMAGE_MARKER, images=[image], params=params)
    return Engine(model, tokenizer).generate([request])[0].text


def batch_multimodal_inference(model, tokenizer, texts: list[str], images: list[Image.Image],
                               batch_size: int = 4) -> list[int]:
    """The greedy next-token id after each `text + image` prompt, `batch_size` prompts per forward pass (left
    padding, so prompts of different lengths batch correctly)."""
    if len(texts) != len(images):
        raise ValueError(f"{len(texts)} texts but {len(images)} images; give one image per text")
    engine, results = Engine(model, tokenizer), []
    for start in range(0, len(texts), batch_size):
        batch = [GenerationRequest(text=t + IMAGE_MARKER, images=[i])
                 for t, i in zip(texts[start:start + batch_size], images[start:start + batch_size])]
        with torch.inference_mode():
            ids, mask, features = engine.prepare(batch)  # left-padded [B, L], features [B, T, ve]
            logits = model(input_ids=ids, attention_mask=mask, image_features=features, use_cache=False,
                           logits_to_keep=1).logits  # [B, 1, V]
        results += logits[:, -1].argmax(-1).tolist()
    return results
