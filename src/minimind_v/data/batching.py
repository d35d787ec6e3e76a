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

With `share_prefix`, the samples of a batch that show the same images (one image's questions) keep their common
start - the prompt and the image's placeholders, up to the question - once per row: the start is one segment, each
sample's rest another that also sees it (`prefix_ids`) and carries on from its positions, so each sample still gets
the logits it would get alone while the image runs through the projector and the prompt through the model once.
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


def pack(samples: list[Sample | tuple[None, str]], max_len: int, pad_token_id: int, one_row: bool = False,
         share_prefix: bool = False) -> dict:
    """Samples -> packed rows (see the module docstring); (None, reason) entries are dropped and counted.
    one_row: every sample in a single row, its length rounded up to a multiple of 64 (for variable-length attention,
    which needs no rows of max_len: almost no padding at all). share_prefix: samples that show the same images and
    start alike keep their common start once per row (`shared_units`), "prefix_ids" says who sees it."""
    kept = [s for s in samples if isinstance(s, Sample)]
    skipped = [s[1] for s in samples if not isinstance(s, Sample)]
    units = shared_units(kept, max_len) if share_prefix else [(0, [i]) for i in range(len(kept))]
    sizes = [p + sum(len(kept[i].input_ids) - p for i in members) for p, members in units]
    if one_row:
        max_len = max(64, -(-sum(sizes) // 64) * 64)
    rows = first_fit(sizes, max_len)
    out = {name: torch.full((len(rows), max_len), fill, dtype=torch.long)  # [R, L] each
           for name, fill in (("input_ids", pad_token_id), ("labels", IGNORE_INDEX), ("position_ids", 0),
                              ("segment_ids", -1), ("prefix_ids", -1))}
    images, keys, bounds = [], [], []
    for r, row in enumerate(rows):
        start, segments = 0, 0
        for u in row:
            (p, members), shared = units[u], -1
            if p:  # the shared start: its own segment, which each member's segment also sees
                bounds.append(r * max_len + start)
                start += _place(out, r, start, kept[members[0]], 0, p, segments, -1)
                shared, segments = segments, segments + 1
            for i in members:
                if not p or i == members[0]:  # a shared start shows its images once
                    images, keys = images + kept[i].images, keys + kept[i].image_keys
                bounds.append(r * max_len + start)
                start += _place(out, r, start, kept[i], p, len(kept[i].input_ids), segments, shared)
                segments += 1
        if start < max_len:  # the row's padding tail: a segment of its own
            bounds.append(r * max_len + start)
    if not share_prefix:
        del out["prefix_ids"]
    return {**out, "cu_seqlens": torch.tensor(bounds + [len(rows) * max_len], dtype=torch.int32),
            "token_mask": (out["segment_ids"] >= 0).long(), "images": batch_images(images), "image_keys": keys,
            "skipped": skipped, "lengths": [len(s.input_ids) for s in kept]}


def _place(out: dict, row: int, start: int, sample: Sample, first: int, end: int, segment: int, prefix: int) -> int:
    """Tokens first..end of a sample into `row` at `start`, at their own positions; -> how many."""
    n = end - first
    out["input_ids"][row, start:start + n] = torch.tensor(sample.input_ids[first:end])
    out["labels"][row, start:start + n] = torch.tensor(sample.labels[first:end])
    out["labels"][row, start] = IGNORE_INDEX  # never predicted from the token before it in the row
    out["position_ids"][row, start:start + n] = torch.arange(first, end)
    out["segment_ids"][row, start:start + n] = segment
    out["prefix_ids"][row, start:start + n] = prefix
    return n


def shared_units(samples: list[Sample], max_len: int) -> list[tuple[int, list[int]]]:
    """(prefix length, sample indices): samples with the same images whose common start p fits every one's
    `shareable` range share it (p tokens once, then each one's rest), as many as fit max_len; others alone (p 0)."""
    groups: dict[tuple, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(tuple(sample.image_keys) if sample.shareable else ("", i), []).append(i)
    units = []
    for members in groups.values():
        ids = [samples[i].input_ids for i in members]
        p = min([samples[i].shareable[1] for i in members] + [common_length(ids[0], other) for other in ids[1:]])
        if len(members) == 1 or p < max(samples[i].shareable[0] for i in members):
            units += [(0, [i]) for i in members]
            continue
        unit, size = [], p
        for i in members:  # as many as fit in one row; the next ones start a unit of their own
            if unit and size + len(samples[i].input_ids) - p > max_len:
                units.append((p, unit) if len(unit) > 1 else (0, unit))
                unit, size = [], p
            unit.append(i)
            size += len(samples[i].input_ids) - p
        units.append((p, unit) if len(unit) > 1 else (0, unit))
    return units


def common_length(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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
