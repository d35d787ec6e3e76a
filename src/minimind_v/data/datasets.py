"""Training data: the datasets that turn records into samples (token ids, loss labels and RGB images).

    data file --records.py--> records --processing.py--> input_ids, labels --images.py--> RGB images -> Sample

`ConversationDataset` (image-text conversations) and `TextDataset` (plain text for pretraining) load a file's records
once and keep the usable ones. Bad records never crash training and never train wrong: each is skipped with a reason
that `SkipStats` counts and logs (skips.py), or converted cleanly and counted (non-RGB images -> RGB, over-long
samples shortened); images are decoded within size limits (images.py). Labels follow the Hugging Face convention:
aligned with input_ids, -100 where there is no loss (the model shifts them).

Epochs after the first cost little host work: a conversation's tokens are kept after their first use (up to
`TOKEN_MEMORY` tokens), and an image whose tower features are already cached (`cached_keys`) is not decoded again -
it was decoded and checked when its features were computed; its Sample carries None in its place.
"""

from __future__ import annotations

import abc
import os
from array import array
from collections.abc import Container
from dataclasses import dataclass

from PIL import Image
from torch.utils.data import Dataset

from ..config import IGNORE_INDEX, MiniMindVConfig
from ..models.image_features import bytes_key
from .images import DEFAULT_LIMITS, ImageLimits, decode_image, read_image_bytes
from .processing import expand_image_markers, placeholder_runs, tokenize_conversation, truncate
from .records import check_conversation, iter_records
from .skips import EMPTY_TEXT, TRUNCATED, WRONG_KIND, SkipRecord, SkipStats


@dataclass
class Sample:
    """One training example. `images` are RGB, in the order of their placeholder runs in `input_ids`."""

    input_ids: list[int]
    labels: list[int]  # same length as input_ids; -100 where there is no loss
    images: list[Image.Image | None]  # None: the image's features are cached (the image was not decoded)
    image_keys: list[str]  # sha256 hex of each image's encoded bytes (a feature-cache key)
    # (lo, hi): the first p tokens, lo <= p <= hi, can be computed once for samples that show the same images and
    # start alike (they hold every image and no loss label, and the token after them has none); None: never
    shareable: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.input_ids) or len(self.image_keys) != len(self.images):
            raise ValueError(f"a Sample needs one label per input id ({len(self.labels)} vs {len(self.input_ids)}) "
                             f"and one key per image ({len(self.image_keys)} vs {len(self.images)})")


TOKEN_MEMORY = 1 << 24  # tokens of tokenized conversations a dataset keeps (128 MB at most, per process)

# ------------------------------------------------------------------------------------------------------ datasets


class _RecordDataset(Dataset, abc.ABC):
    """Loads records once, keeps the usable ones, and turns a record's SkipRecord into a counted (None, reason)."""

    def __init__(self, path: str | os.PathLike, tokenizer, max_seq_len: int, image_root: str | None,
                 stats: SkipStats | None):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.stats = stats if stats is not None else SkipStats()
        self.records: list[dict] = []
        shared: dict[bytes, bytes] = {}  # an image that several records ask about is kept in memory once
        for record in iter_records(path, image_root, self.stats):
            try:
                self._check(record)
            except SkipRecord as skip:
                self.stats.add(skip.reason, f"{path}: {skip.detail}")
                continue
            if record.get("images"):
                record["images"] = [shared.setdefault(i, i) if isinstance(i, bytes) else i for i in record["images"]]
            self.records.append(record)
        if not self.records:
            raise ValueError(f"no usable records in {os.fspath(path)!r}: {self.stats.summary()}")
        self._skipped: dict[int, str] = {}  # index -> reason: a skipped record is counted once

    def image_groups(self) -> list[int]:
        """Each record's group number: records that show the same images (equal bytes or paths, in order) share one,
        numbered by first appearance; a record without images is a group of its own."""
        numbers: dict[tuple, int] = {}
        return [numbers.setdefault(tuple(record.get("images") or ()) or ("", i), len(numbers))
                for i, record in enumerate(self.records)]

    def image_records(self) -> int:
        """How many of the kept records show images."""
        return sum(bool(record.get("images")) for record in self.records)

    @abc.abstractmethod
    def _check(self, record: dict) -> None:
        """Raise SkipRecord for a record that cannot be used (text-level checks, at construction)."""

    @abc.abstractmethod
    def _build(self, record: dict, index: int) -> Sample:
        """Record `index` as a Sample, or SkipRecord (image and length problems, at access)."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample | tuple[None, str]:
        if i in self._skipped:
            return None, self._skipped[i]
        try:
            return self._build(self.records[i], i)
        except SkipRecord as skip:
            self._skipped[i] = skip.reason
            self.stats.add(skip.reason, f"record {i}: {skip.detail}")
            return None, skip.reason


class ConversationDataset(_RecordDataset):
    """Image-text conversations -> `Sample`s with the loss on the assistant turns only. Text-level problems (empty
    conversation, no or empty assistant turn, marker/image count mismatch, unparsable records) are counted in
    `stats` at construction and the record left out; image and length problems come back from `__getitem__` as
    (None, reason) and are counted then, once per record."""

    def __init__(self, path: str | os.PathLike, tokenizer, config: MiniMindVConfig, max_seq_len: int,
                 image_root: str | None = None, stats: SkipStats | None = None,
                 image_limits: ImageLimits = DEFAULT_LIMITS):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("ConversationDataset needs a fast tokenizer (it maps characters to tokens by offsets)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; conversations cannot be rendered")
        self.config, self.image_limits = config, image_limits
        self.transform = None  # e.g. image -> pixel values [3, H, W], so that loader workers preprocess too
        self.cached_keys: Container[str] = ()  # keys of images whose features are cached: not decoded
        self._tokens: dict[int, tuple[array, array, int, bool]] = {}  # record index -> its tokens, once used
        self._token_count = 0
        super().__init__(path, tokenizer, max_seq_len, image_root, stats)

    def _check(self, record: dict) -> None:
        check_conversation(record)

    def _build(self, record: dict, index: int) -> Sample:
        known = self._tokens.get(index)
        if known is None:
            known = self._tokenize(record)
            if self._token_count + len(known[0]) <= TOKEN_MEMORY:
                self._tokens[index] = known
                self._token_count += len(known[0])
        input_ids, labels, kept, truncated = known
        if truncated:
            self.stats.convert(TRUNCATED)
        keys, images = [], []
        for ref in record["images"][:kept]:
            data = read_image_bytes(ref)
            key = bytes_key(data)
            image = None if key in self.cached_keys else decode_image(data, self.image_limits, self.stats)
            keys.append(key)
            images.append(image if image is None or self.transform is None else self.transform(image))
        return Sample(input_ids.tolist(), labels.tolist(), images, keys,
                      shareable_start(input_ids, labels, self.config.image_token_id) if keys else None)

    def _tokenize(self, record: dict) -> tuple[array, array, int, bool]:
        """(input_ids, labels, images kept, whether it was cut) of a record within max_seq_len."""
        config = self.config
        messages = [{**t, "content": expand_image_markers(t["content"], config)} for t in record["conversations"]]
        input_ids, labels = tokenize_conversation(self.tokenizer, messages)
        starts = placeholder_runs(input_ids, config.image_token_id, config.image_token_len, len(record["images"]))
        for s in starts:  # placeholders never carry a loss, even inside an assistant turn
            labels[s:s + config.image_token_len] = [IGNORE_INDEX] * config.image_token_len
        full_len = len(input_ids)
        input_ids, labels, kept = truncate(input_ids, labels, starts, config.image_token_len, self.max_seq_len)
        return array("i", input_ids), array("i", labels), kept, len(input_ids) < full_len


def shareable_start(input_ids: array, labels: array, image_token_id: int) -> tuple[int, int] | None:
    """(lo, hi) of Sample.shareable: lo just past the last image placeholder, hi the last position before the first
    label (so the token at p carries no label either); None when lo > hi."""
    ids = input_ids.tolist()
    lo = len(ids) - ids[::-1].index(image_token_id) if image_token_id in ids else 0
    hi = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels)) - 1
    return (lo, hi) if lo <= hi else None


class TextDataset(_RecordDataset):
    """Plain text ({"text": ...}) for language-model pretraining: bos + tokens + eos, labels = input_ids, cut to
    max_seq_len. bos/eos ids come from the config, or from the tokenizer where the config has none."""

    def __init__(self, path: str | os.PathLike, tokenizer, config: MiniMindVConfig, max_seq_len: int,
                 stats: SkipStats | None = None):
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        self.bos_id = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
        self.eos_id = eos if eos is not None else tokenizer.eos_token_id
        super().__init__(path, tokenizer, max_seq_len, None, stats)

    def _check(self, record: dict) -> None:
        if "text" not in record:
            raise SkipRecord(WRONG_KIND, "a conversation record in a plain-text dataset (use ConversationDataset)")
        if not record["text"].strip():
            raise SkipRecord(EMPTY_TEXT, "the text is empty")

    def _build(self, record: dict, index: int) -> Sample:
        ids = self.tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        bos, eos = [self.bos_id] if self.bos_id is not None else [], [self.eos_id] if self.eos_id is not None else []
        ids = bos + list(ids) + eos
        if len(ids) > self.max_seq_len:
            ids = ids[:self.max_seq_len]
            self.stats.convert(TRUNCATED)
        return Sample(ids, list(ids), [], [])
