"""Prompts: `<image>` markers -> placeholder runs, chat template -> input_ids, as the original MiniMind-V builds them.

MiniMind2-V's placeholder text is `'@' * 196` (196 tokens of id 34); minimind-3v's is `'<|image_pad|>'` repeated 64
times. Either way one `<image>` in a message becomes `image_token_len` placeholder ids.
"""

from __future__ import annotations

import torch

from ..config import IMAGE_MARKER, MiniMindVConfig


def placeholder_text(config: MiniMindVConfig) -> str:
    """The text that stands for one image: image_special_token, repeated when it is a single token."""
    return config.image_special_token * (config.image_token_len // len(config.image_ids))


def expand_image_markers(text: str, config: MiniMindVConfig) -> str:
    return text.replace(IMAGE_MARKER, placeholder_text(config))


def chat_prompt(tokenizer, config: MiniMindVConfig, messages: list[dict[str, str]] | str,
                add_generation_prompt: bool = True) -> str:
    """Messages (or one user prompt) with `<image>` markers -> the chat-templated text the model reads."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    expanded = [{**m, "content": expand_image_markers(m["content"], config)} for m in messages]
    return tokenizer.apply_chat_template(expanded, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_prompt(tokenizer, config: MiniMindVConfig, messages: list[dict[str, str]] | str) -> torch.Tensor:
    """-> input_ids [1, L], checked to hold one full placeholder run per `<image>` marker."""
    text = chat_prompt(tokenizer, config, messages)
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    markers = sum(m["content"].count(IMAGE_MARKER) for m in
                  ([{"content": messages}] if isinstance(messages, str) else messages))
    check_placeholders(input_ids[0].tolist(), markers, config)
    return input_ids


def check_placeholders(input_ids: list[int], markers: int, config: MiniMindVConfig) -> None:
    """ValueError unless the ids hold one full placeholder run per `<image>` marker."""
    found = sum(1 for i in input_ids if i == config.image_token_id)
    if found != markers * config.image_token_len:
        raise ValueError(f"the tokenizer turned {markers} <image> marker(s) into {found} placeholder ids "
                         f"(id {config.image_token_id}); expected {markers * config.image_token_len} — is this the "
                         "model's own tokenizer?")
