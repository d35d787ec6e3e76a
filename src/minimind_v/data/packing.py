"""Sequence packing: several samples per row, no compute on padding.

    samples (each <= max_len tokens) --first-fit decreasing--> rows of max_len tokens
    input_ids, labels, position_ids [R, L]     positions restart at 0 for every sample
    segment_ids [R, L]                         which sample of the row each position holds (-1: padding)
    token_mask [R, L]                          1 on real tokens (what throughput counts)
    images                                     in the order their placeholders appear, row by row

`packed_attention_mask(segment_ids)` makes the model's mask [R, 1, L, L] (block-diagonal causal: a token sees the
earlier tokens of its own sample) where it is used, on the GPU, so loader workers never ship L x L masks. Each
sample's first label is ignored, so no loss crosses from one sample into the next; the padding at a row's end is one
more block (it sees only itself and its own padding, so no attention row is empty). A packed row gives every sample
the logits it would get alone (tests/test_packing.py).
"""

from __future__ import annotations

import torch

from .datasets import IGNORE_INDEX, Sample


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: longest first, each into the first row with room."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def pack(samples: list[Sample | tuple[None, str]], max_len: int, pad_token_id: int) -> dict:
    """Samples -> packed rows (see the module docstring); (None, reason) entries are dropped and counted."""
    kept = [s for s in samples if isinstance(s, Sample)]
    skipped = [s[1] for s in samples if not isinstance(s, Sample)]
    rows = first_fit([len(s.input_ids) for s in kept], max_len)
    input_ids = torch.full((len(rows), max_len), pad_token_id, dtype=torch.long)  # [R, L]
    labels = torch.full((len(rows), max_len), IGNORE_INDEX, dtype=torch.long)  # [R, L]
    position_ids = torch.zeros((len(rows), max_len), dtype=torch.long)  # [R, L]
    segment = torch.full((len(rows), max_len), -1, dtype=torch.long)  # [R, L]: sample of each position, -1 pad
    images, keys = [], []
    for r, members in enumerate(rows):
        start = 0
        for number, i in enumerate(members):
            sample, n = kept[i], len(kept[i].input_ids)
            input_ids[r, start:start + n] = torch.tensor(sample.input_ids)
            labels[r, start:start + n] = torch.tensor(sample.labels)
            labels[r, start] = IGNORE_INDEX  # never predicted from the previous sample's last token
            position_ids[r, start:start + n] = torch.arange(n)
            segment[r, start:start + n] = number
            images += sample.images
            keys += sample.image_keys
            start += n
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment,
            "token_mask": (segment >= 0).long(),
            "images": images, "image_keys": keys, "skipped": skipped,
            "lengths": [len(s.input_ids) for s in kept]}


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [R, L] -> bool [R, 1, L, L]: same sample (or both padding) and not in the future."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()  # [L, L]
    return ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
