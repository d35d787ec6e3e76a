"""Bad records: the reasons a record is skipped (`SkipRecord`) and their counts (`SkipStats`).

Bad data never crashes training and never trains wrong: each bad record is skipped with a reason that `SkipStats`
counts and logs (the first few of each reason), or converted cleanly and counted (non-RGB images -> RGB, over-long
samples shortened).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

logger = logging.getLogger(__name__)

LOGGED_PER_REASON = 5

# skip reasons
BAD_JSON = "bad json"
NOT_UTF8 = "not UTF-8"
BAD_RECORD = "bad record"
WRONG_KIND = "wrong record kind"
EMPTY_CONVERSATION = "empty conversation"
EMPTY_ASSISTANT = "empty assistant turn"
ASSISTANT_FIRST = "assistant speaks first"
EMPTY_TEXT = "empty text"
MARKER_MISMATCH = "image/marker count mismatch"
PLACEHOLDER_MISMATCH = "placeholder count mismatch"
TEMPLATE_ERROR = "chat template error"
MISSING_IMAGE = "missing image file"
CORRUPT_IMAGE = "corrupt image"
DECOMPRESSION_BOMB = "decompression bomb"
IMAGE_SHAPE = "image side or aspect ratio over the limits"
TOO_LONG = "too long"
NO_SUPERVISION = "no supervised tokens"
TRUNCATED = "truncated"  # a conversion, not a skip


class SkipRecord(Exception):
    """A record that must be skipped, with its reason (one of the constants above). The datasets catch and count
    it; the public helpers below (load_image, tokenize_conversation, ...) raise it."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class SkipStats:
    """Counts of skipped records by reason (`counts`) and of clean conversions (`converted`, e.g. "RGBA->RGB",
    "truncated"). DataLoader workers count in their own copies, so a trainer merges the `skipped` reasons of each
    collated batch (`merge(batch["skipped"])`) into a SkipStats of its own: not the dataset's, which already counts
    them itself when num_workers=0."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = Counter()
        self.converted: dict[str, int] = Counter()
        self.total = 0  # records read from data files

    def add(self, reason: str, detail: str = "") -> None:
        """Count one skipped record; log the first few of each reason."""
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= LOGGED_PER_REASON:
            tail = f" (further '{reason}' skips are counted, not logged)" if n == LOGGED_PER_REASON else ""
            logger.warning("skipped a record (%s)%s%s", reason, f": {detail}" if detail else "", tail)

    def convert(self, kind: str) -> None:
        """Count one clean conversion, e.g. "RGBA->RGB"."""
        self.converted[kind] += 1

    def merge(self, other_counts: dict[str, int] | Iterable[str]) -> None:
        """Add skip counts from another process: a {reason: count} dict or a list of reasons."""
        counts = other_counts if isinstance(other_counts, dict) else Counter(other_counts)
        for reason, n in counts.items():
            self.counts[reason] += n

    def summary(self, total: int | None = None) -> str:
        """e.g. "skipped 3 of 100 records: 2 corrupt image, 1 too long; converted: 1 RGBA->RGB"."""
        total = total if total is not None else self.total
        skipped = sum(self.counts.values())
        out = f"skipped {skipped}" + (f" of {total}" if total else "") + " records"
        if skipped:
            out += ": " + ", ".join(f"{n} {reason}" for reason, n in Counter(self.counts).most_common())
        if self.converted:
            out += "; converted: " + ", ".join(f"{n} {kind}" for kind, n in Counter(self.converted).most_common())
        return out
