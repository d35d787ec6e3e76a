"""Batches for the training loop: padded rows (`collate`) or packed rows (`pack`); the images of either.

`collate` right-pads every sample to the longest: input_ids, labels, attention_mask [B, L].

`pack` puts several samples in a row, no compute on padding:

    samples (each <= max_len tokens) --first-fit decreasing--> rows of max_len tokens
    input_ids, labels, position_ids [R, L]     positions restart at 0 for every sample
    segment_ids [R, L]                         which sample of the row each position holds (-1: padding)
    cu_seqlens [segments + 1]                  int32 starts of every sample and padding tail in the flat R * L
    token_mask [R, L]                          1 on real tokens (what throughput counts)
    images                                     in the order their placeholders appear, row by row

The model takes `segment_ids` and `cu_seqlens` as a `PackedMask` (models/attention.py): variable-length
FlashAttention on CUDA, else the block-diagonal causal mask [R, 1, L, L] built where it is used, so loader workers
never ship L x L masks. Each sample's first label is ignored, so no loss crosses from one sample into the next; the
padding at a row's end is one more segment (it sees only itself and its own padding, so no attention row is empty).
A packed row gives every sample the logits it would get alone (tests/test_packing.py).
"""

from __future__ import annotations

import torch

from ..config import IGNORE_INDEX
from .datasets import Sample


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


def pack(samples: list[Sample | tuple[None, str]], max_len: int, pad_token_id: int, one_row: bool = False) -> dict:
    """Samples -> packed rows (see the module docstring); (None, reason) entries are dropped and counted.
    one_row: every sample in a single row, its length rounded up to a multiple of 64 (for variable-length attention,
    which needs no rows of max_len: almost no padding at all)."""
    kept = [s for s in samples if isinstance(s, Sample)]
    skipped = [s[1] for s in samples if not isinstance(s, Sample)]
    if one_row:
        max_len = max(64, -(-sum(len(s.input_ids) for s in kept) // 64) * 64)
    rows = first_fit([len(s.input_ids) for s in kept], max_len)
    input_ids = torch.full((len(rows), max_len), pad_token_id, dtype=torch.long)  # [R, L]
    labels = torch.full((len(rows), max_len), IGNORE_INDEX, dtype=torch.long)  # [R, L]
    position_ids = torch.zeros((len(rows), max_len), dtype=torch.long)  # [R, L]
    segment = torch.full((len(rows), max_len), -1, dtype=torch.long)  # [R, L]: sample of each position, -1 pad
    images, keys, bounds = [], [], []
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
            bounds.append(r * max_len + start)
            start += n
        if start < max_len:  # the row's padding tail: a segment of its own
            bounds.append(r * max_len + start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment,
            "cu_seqlens": torch.tensor(bounds + [len(rows) * max_len], dtype=torch.int32),
            "token_mask": (segment >= 0).long(),
            "images": batch_images(images), "image_keys": keys, "skipped": skipped,
            "lengths": [len(s.input_ids) for s in kept]}


def collate(samples: list[Sample | tuple[None, str]], pad_token_id: int) -> dict:
    """Samples -> a right-padded batch; (None, reason) entries are dropped and their reasons returned in "skipped".
    Use with a DataLoader as `functools.partial(collate, pad_token_id=tokenizer.pad_token_id)`."""
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id (the tokenizer has none: set tokenizer.pad_token)")
    kept = [s for s in samples if isinstance(s, Sample)]
    skipped = [s[1] for s in samples if not isinstance(s, Sample)]
    length = max((len(s.input_ids) for s in kept), default=0)
    input_ids = torch.full((len(kept), length), pad_token_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(kept), length), dtype=torch.long)  # [B, L]: 1 real, 0 pad
    for row, sample in enumerate(kept):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "token_mask": attention_mask,
            "lengths": [len(s.input_ids) for s in kept], "images": batch_images([i for s in kept for i in s.images]),
            "image_keys": [key for s in kept for key in s.image_keys], "skipped": skipped}


def batch_images(images: list) -> list | torch.Tensor:
    """The batch's images in reading order: pixel values that loader workers made ([3, H, W] each) as one stacked
    [N, 3, H, W] tensor (one pinned block, one copy to the GPU), PIL images as they are."""
    if images and all(isinstance(image, torch.Tensor) for image in images):
        return torch.stack(images)
    return images
