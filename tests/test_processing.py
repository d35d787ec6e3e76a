"""Prompt building: <image> markers become placeholder runs inside the chat template."""

import pytest

from helpers import tiny_config
from minimind_v import MiniMindVConfig
from minimind_v.data.processing import chat_prompt, encode_prompt


def test_the_image_placeholder_of_both_generations():
    assert MiniMindVConfig.from_name("minimind2-v").image_placeholder == "@" * 196
    assert MiniMindVConfig.from_name("minimind-3v").image_placeholder == "<|image_pad|>" * 64


def test_encode_prompt_expands_markers_and_checks_the_count(tokenizer):
    config = tiny_config()  # 16 x '@' per image
    text = chat_prompt(tokenizer, config, [{"role": "user", "content": "look <image> and <image>"}])
    assert text.startswith("<|im_start|>user\nlook " + "@" * 16) and text.endswith("<|im_start|>assistant\n")
    ids = encode_prompt(tokenizer, config, "look <image> and <image>")
    assert int((ids == 34).sum()) == 32
    with pytest.raises(ValueError, match=r"1 <image> marker\(s\) into 17 placeholder ids"):
        encode_prompt(tokenizer, config, "mail me @ home <image>")  # a stray '@' is a placeholder id too
