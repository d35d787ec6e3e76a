"""The chat template: prompts and conversations -> token ids, as the original MiniMind-V builds them.

MiniMind2-V's placeholder text is `'@' * 196` (196 tokens of id 34); minimind-3v's is `'<|image_pad|>'` repeated 64
times. Either way one `<image>` in a message becomes `image_token_len` placeholder ids.

    prompts (inference)        messages -> chat_prompt -> input_ids, checked to hold one run per image
    conversations (training)   messages -> tokenize_conversation -> input_ids + labels: the assistant turns and their
                               end token carry the loss (found from the rendered template, whatever the template);
                               `truncate` never cuts a placeholder run nor leaves more than max_len tokens
"""

from __future__ import annotations

import re

import torch
from jinja2 import TemplateError

from ..config import IGNORE_INDEX, IMAGE_MARKER, MiniMindVConfig
from .skips import NO_SUPERVISION, PLACEHOLDER_MISMATCH, TEMPLATE_ERROR, TOO_LONG, SkipRecord


def expand_image_markers(text: str, config: MiniMindVConfig) -> str:
    return text.replace(IMAGE_MARKER, config.image_placeholder)


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



def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        raise SkipRecord(TEMPLATE_ERROR, f"{type(err).__name__}: {err}") from None


def _prefix_window(tokenizer, messages: list[dict], k: int, text: str) -> tuple[int, int] | None:
    """Where assistant turn k can lie in `text`: after messages[:k] rendered with the generation prompt (so
    scaffolding such as '<|im_start|>assistant\\n' stays out), up to the end of messages[:k+1] rendered. None when
    the template does not render prefixes of a conversation as prefixes of its text."""
    try:
        before = _render(tokenizer, messages[:k], add_generation_prompt=True)
        upto = _render(tokenizer, messages[:k + 1])
    except SkipRecord:
        return None
    return (len(before), len(upto)) if upto.startswith(before) and text.startswith(upto) else None


def assistant_spans(tokenizer, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans in `text` (the rendered conversation) of each assistant turn's content plus the eos token
    that closes it, if the template puts one right after it (whitespace after the eos stays out). Turns are
    searched in order, each inside its prefix window when the template has one, else after the previous turn."""
    spans, cursor = [], 0
    for k, message in enumerate(messages):
        content, is_assistant = message["content"].strip(), message["role"] == "assistant"
        window = _prefix_window(tokenizer, messages, k, text) if is_assistant else None
        low, high = window if window is not None and window[0] >= cursor else (cursor, len(text))
        start = text.find(content, low, high)
        if start < 0:
            if is_assistant:
                raise SkipRecord(TEMPLATE_ERROR, "an assistant turn's text is not in the rendered conversation")
            continue  # a template may rewrite a system or user turn; it carries no loss anyway
        cursor = start + len(content)
        if is_assistant:
            eos = tokenizer.eos_token
            closing = re.match(r"\s*" + re.escape(eos), text[cursor:high]) if eos else None
            cursor += closing.end() if closing else 0
            spans.append((start, cursor))
    return spans


def tokenize_conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Chat-templated messages (markers already expanded) -> (input_ids, labels). Labels are the ids of each
    assistant turn's content and its end-of-turn eos, -100 elsewhere. Works for any chat template: assistant turns
    are located as character spans and mapped to tokens through the fast tokenizer's offsets."""
    text = _render(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, (a, b) in enumerate(encoding["offset_mapping"]):
        if b > a and any(a < end and b > start for start, end in spans):  # the token overlaps an assistant span
            labels[i] = input_ids[i]
    return input_ids, labels


def placeholder_runs(input_ids: list[int], token_id: int, run_len: int, n_images: int) -> list[int]:
    """Start of each image's placeholder run; raises SkipRecord unless there are exactly n_images full runs."""
    positions = [i for i, t in enumerate(input_ids) if t == token_id]
    starts = positions[::run_len]
    if len(positions) != n_images * run_len or any(  # the count, then that each run is contiguous
            positions[j * run_len + run_len - 1] != s + run_len - 1 for j, s in enumerate(starts)):
        raise SkipRecord(PLACEHOLDER_MISMATCH,
                         f"{len(positions)} placeholder ids (id {token_id}) for {n_images} image(s) of {run_len}: "
                         "does the text hold a stray placeholder character?")
    return starts


def truncate(input_ids: list[int], labels: list[int], run_starts: list[int], run_len: int,
             max_len: int) -> tuple[list[int], list[int], int]:
    """Cut to max_len without splitting a placeholder run: a cut inside or before the end of a run moves to that run's
    start, dropping its image and all later ones. -> (input_ids, labels, images kept); raises SkipRecord when nothing
    supervised is left."""
    kept, cut = len(run_starts), len(input_ids)
    if cut > max_len:
        kept = next((k for k, s in enumerate(run_starts) if s + run_len > max_len), len(run_starts))
        cut = min(run_starts[kept], max_len) if kept < len(run_starts) else max_len
    labels = labels[:cut]
    if all(label == IGNORE_INDEX for label in labels):
        reason = TOO_LONG if cut < len(input_ids) else NO_SUPERVISION
        raise SkipRecord(reason, f"{len(input_ids)} tokens, max_seq_len {max_len}: no supervised token before the cut")
    return input_ids[:cut], labels, kept
