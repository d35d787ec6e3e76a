"""Training data: conversation and plain-text records -> token ids, loss labels and RGB images.

`iter_records` reads three layouts, chosen by the file's extension, and normalises each record to
`{"conversations": [{"role", "content"}, ...], "images": [bytes | path, ...]}` or `{"text": str}`:

- `.parquet`, MiniMind-V's own layout: `conversations` (a JSON string, or a list, of {"role", "content"} turns) and
  `image_bytes` (one encoded image or a list of them). `<image>` in a turn marks where each image goes.
- `.json` (a list of records) or `.jsonl`, LLaVA style: `image` (a path or a list of paths, relative to
  `image_root`, which defaults to the data file's folder) and `conversations` of {"from": "human" | "gpt" |
  "system", "value"} turns; role/content keys work too.
- `.jsonl` (or `.parquet`) with a `text` field: plain text for language-model pretraining (`TextDataset`).

Bad records never crash training and never train wrong: each is skipped with a reason that `SkipStats` counts and
logs (skips.py), or converted cleanly and counted (non-RGB images -> RGB, over-long samples shortened); images are
decoded within size limits (images.py). Labels follow the Hugging Face convention: aligned with input_ids, -100 where there is no loss (the
model shifts them).
"""

from __future__ import annotations

import abc
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from jinja2 import TemplateError
from PIL import Image
from torch.utils.data import Dataset

from ..config import IGNORE_INDEX, IMAGE_MARKER, MiniMindVConfig
from .images import DEFAULT_LIMITS, ImageLimits, load_image
from .processing import expand_image_markers
from .skips import (ASSISTANT_FIRST, BAD_JSON, BAD_RECORD, EMPTY_ASSISTANT, EMPTY_CONVERSATION, EMPTY_TEXT, MARKER_MISMATCH,
                    NO_SUPERVISION, PLACEHOLDER_MISMATCH, TEMPLATE_ERROR, TOO_LONG, TRUNCATED, WRONG_KIND,
                    SkipRecord, SkipStats)

SUPPORTED_EXTENSIONS = (".parquet", ".json", ".jsonl")
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


@dataclass
class Sample:
    """One training example. `images` are RGB, in the order of their placeholder runs in `input_ids`."""

    input_ids: list[int]
    labels: list[int]  # same length as input_ids; -100 where there is no loss
    images: list[Image.Image]
    image_keys: list[str]  # sha256 hex of each image's encoded bytes (a feature-cache key)

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.input_ids) or len(self.image_keys) != len(self.images):
            raise ValueError(f"a Sample needs one label per input id ({len(self.labels)} vs {len(self.input_ids)}) "
                             f"and one key per image ({len(self.image_keys)} vs {len(self.images)})")


# ----------------------------------------------------------------------------------------------- reading records


def iter_records(path: str | os.PathLike, image_root: str | None = None,
                 stats: SkipStats | None = None) -> Iterator[dict]:
    """Yield every record of a data file, normalised (see the module docstring). Records that cannot be parsed are
    counted in `stats` ("bad json", "bad record") and not yielded. Image paths come back absolute, resolved against
    `image_root` (default: the data file's folder)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(f"unsupported data file {path!r}: the extension must be one of "
                         f"{', '.join(SUPPORTED_EXTENSIONS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    stats = stats if stats is not None else SkipStats()
    base = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    rows = _parquet_rows(path) if ext == ".parquet" else _json_rows(path, whole_file=ext == ".json")
    for n, row in enumerate(rows, 1):
        stats.total += 1
        try:
            if isinstance(row, SkipRecord):
                raise row
            record = _normalise_record(row, base)
        except SkipRecord as skip:
            stats.add(skip.reason, f"{path} record {n}: {skip.detail}")
            continue
        yield record


def _parquet_rows(path: str) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from err
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _json_rows(path: str, whole_file: bool) -> Iterator[dict | SkipRecord]:
    """A .json list (or a .json file that is really JSON lines) or .jsonl, row by row; bad lines as SkipRecord."""
    if whole_file:
        with open(path, "rb") as f:
            try:
                data = json.loads(f.read())
            except ValueError:
                data = None  # not one JSON document: read it as JSON lines below
        if data is not None:
            yield from (row if isinstance(row, dict) else SkipRecord(BAD_RECORD, "not a JSON object")
                        for row in (data if isinstance(data, list) else [data]))
            return
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                yield SkipRecord(BAD_JSON, str(err))
                continue
            yield row if isinstance(row, dict) else SkipRecord(BAD_RECORD, "not a JSON object")


def _normalise_record(raw: dict, image_dir: str = "") -> dict:
    """One raw record of any supported layout -> {"conversations", "images"} or {"text"}; raises SkipRecord."""
    turns = raw.get("conversations", raw.get("messages"))
    if turns is None:
        if isinstance(raw.get("text"), str):
            return {"text": raw["text"]}
        raise SkipRecord(BAD_RECORD, f"no 'conversations' or 'text' field (keys: {sorted(raw)})")
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except ValueError as err:
            raise SkipRecord(BAD_JSON, f"conversations: {err}") from None
    if not isinstance(turns, list):
        raise SkipRecord(BAD_RECORD, f"'conversations' must be a list of turns, got {type(turns).__name__}")
    return {"conversations": [_turn(t) for t in turns], "images": _image_refs(raw, image_dir)}


def _turn(turn: object) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise SkipRecord(BAD_RECORD, f"a turn must be an object, got {type(turn).__name__}")
    role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
    if role not in _ROLES:
        raise SkipRecord(BAD_RECORD, f"unknown role {role!r} (known: {', '.join(_ROLES)})")
    if not isinstance(content, (str, type(None))):
        raise SkipRecord(BAD_RECORD, f"a turn's content must be text, got {type(content).__name__}")
    return {"role": _ROLES[role], "content": content or ""}


def _image_refs(raw: dict, image_dir: str) -> list[bytes | str]:
    """The record's images as encoded bytes or absolute paths, from image_bytes / images / image."""
    value = next((raw[k] for k in ("image_bytes", "images", "image") if raw.get(k) is not None), None)
    items = [] if value is None else value if isinstance(value, (list, tuple)) else [value]
    refs = []
    for item in items:
        if isinstance(item, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            item = item.get("bytes") or item.get("path")
        if isinstance(item, (bytes, bytearray, memoryview)):
            refs.append(bytes(item))
        elif isinstance(item, str) and item:
            refs.append(os.path.join(image_dir, item))  # join keeps an absolute path as it is
        else:
            raise SkipRecord(BAD_RECORD, f"an image must be encoded bytes or a path, got {type(item).__name__}")
    return refs


def _check_conversation(record: dict) -> None:
    """The text-only checks, done once when a dataset loads: raises SkipRecord for an unusable conversation."""
    turns = record.get("conversations")
    if turns is None:
        raise SkipRecord(WRONG_KIND, "a plain-text record in a conversation dataset (use TextDataset)")
    if not any(t["role"] == "assistant" for t in turns):
        raise SkipRecord(EMPTY_CONVERSATION, f"{len(turns)} turn(s), none from the assistant")
    first = next(t["role"] for t in turns if t["role"] != "system")
    if first == "assistant":  # an answer to no question: nothing to condition it on
        raise SkipRecord(ASSISTANT_FIRST, "the first turn after any system message is the assistant's")
    if any(t["role"] == "assistant" and not t["content"].strip() for t in turns):
        raise SkipRecord(EMPTY_ASSISTANT, "an assistant turn has no text")
    markers = sum(t["content"].count(IMAGE_MARKER) for t in turns)
    if markers != len(record["images"]):
        raise SkipRecord(MARKER_MISMATCH,
                         f"{markers} {IMAGE_MARKER} marker(s) but {len(record['images'])} image(s)")


# --------------------------------------------------------------------------------------------------- tokenising


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
        for record in iter_records(path, image_root, self.stats):
            try:
                self._check(record)
            except SkipRecord as skip:
                self.stats.add(skip.reason, f"{path}: {skip.detail}")
                continue
            self.records.append(record)
        if not self.records:
            raise ValueError(f"no usable records in {os.fspath(path)!r}: {self.stats.summary()}")
        self._skipped: dict[int, str] = {}  # index -> reason: a skipped record is counted once

    @abc.abstractmethod
    def _check(self, record: dict) -> None:
        """Raise SkipRecord for a record that cannot be used (text-level checks, at construction)."""

    @abc.abstractmethod
    def _build(self, record: dict) -> Sample:
        """The record as a Sample, or SkipRecord (image and length problems, at access)."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample | tuple[None, str]:
        if i in self._skipped:
            return None, self._skipped[i]
        try:
            return self._build(self.records[i])
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
        super().__init__(path, tokenizer, max_seq_len, image_root, stats)

    def _check(self, record: dict) -> None:
        _check_conversation(record)

    def _build(self, record: dict) -> Sample:
        config = self.config
        messages = [{**t, "content": expand_image_markers(t["content"], config)} for t in record["conversations"]]
        input_ids, labels = tokenize_conversation(self.tokenizer, messages)
        starts = placeholder_runs(input_ids, config.image_token_id, config.image_token_len, len(record["images"]))
        for s in starts:  # placeholders never carry a loss, even inside an assistant turn
            labels[s:s + config.image_token_len] = [IGNORE_INDEX] * config.image_token_len
        full_len = len(input_ids)
        input_ids, labels, kept = truncate(input_ids, labels, starts, config.image_token_len, self.max_seq_len)
        loaded = [load_image(ref, self.image_limits, self.stats) for ref in record["images"][:kept]]
        if len(input_ids) < full_len:
            self.stats.convert(TRUNCATED)
        images = [image if self.transform is None else self.transform(image) for image, _ in loaded]
        return Sample(input_ids, labels, images, [key for _, key in loaded])


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

    def _build(self, record: dict) -> Sample:
        ids = self.tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        bos, eos = [self.bos_id] if self.bos_id is not None else [], [self.eos_id] if self.eos_id is not None else []
        ids = bos + list(ids) + eos
        if len(ids) > self.max_seq_len:
            ids = ids[:self.max_seq_len]
            self.stats.convert(TRUNCATED)
        return Sample(ids, list(ids), [], [])
