"""Data files -> normalised records. `iter_records` reads three layouts, chosen by the file's extension, and
normalises each record to `{"conversations": [{"role", "content"}, ...], "images": [bytes | path, ...]}` or
`{"text": str}`:

- `.parquet`, MiniMind-V's own layout: `conversations` (a JSON string, or a list, of {"role", "content"} turns) and
  `image_bytes` (one encoded image or a list of them). `<image>` in a turn marks where each image goes.
- `.json` (a list of records) or `.jsonl`, LLaVA style: `image` (a path or a list of paths, relative to
  `image_root`, which defaults to the data file's folder) and `conversations` of {"from": "human" | "gpt" |
  "system", "value"} turns; role/content keys work too.
- `.jsonl` (or `.parquet`) with a `text` field: plain text for language-model pretraining.

A record that cannot be read is counted in a `SkipStats` with its reason (skips.py) and left out. The other way:
`write_parquet` writes (conversation, image) rows in MiniMind-V's layout, each distinct image stored once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from ..config import IMAGE_MARKER
from .skips import (ASSISTANT_FIRST, BAD_JSON, BAD_RECORD, EMPTY_ASSISTANT, EMPTY_CONVERSATION, MARKER_MISMATCH,
                    WRONG_KIND, SkipRecord, SkipStats)

SUPPORTED_EXTENSIONS = (".parquet", ".json", ".jsonl")
TEXT_FIELDS = ("conversations", "messages", "text")
IMAGE_FIELDS = ("image_bytes", "images", "image")
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}



def iter_records(path: str | os.PathLike, image_root: str | None = None, stats: SkipStats | None = None,
                 text_only: bool = False) -> Iterator[dict]:
    """Yield every record of a data file, normalised (see the module docstring). Records that cannot be parsed are
    counted in `stats` ("bad json", "bad record") and not yielded. Image paths come back absolute, resolved against
    `image_root` (default: the data file's folder). `text_only`: the images are not read (empty lists)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(f"unsupported data file {path!r}: the extension must be one of "
                         f"{', '.join(SUPPORTED_EXTENSIONS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    stats = stats if stats is not None else SkipStats()
    base = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    rows = _parquet_rows(path, text_only) if ext == ".parquet" else _json_rows(path, whole_file=ext == ".json")
    for n, row in enumerate(rows, 1):
        stats.total += 1
        try:
            if isinstance(row, SkipRecord):
                raise row
            record = _normalise_record({k: v for k, v in row.items() if k not in IMAGE_FIELDS} if text_only else row,
                                       base)
        except SkipRecord as skip:
            stats.add(skip.reason, f"{path} record {n}: {skip.detail}")
            continue
        yield record


def qa_conversations(rows: list[tuple[str, str, bytes]]) -> list[tuple[list[dict], bytes]]:
    """(question, answer, encoded image) -> (conversation, image): one question per conversation, the image marked
    before it. (Several questions of an image in one conversation train faster but answer worse: later turns learn
    to lean on the earlier answers.)"""
    return [([{"role": "user", "content": IMAGE_MARKER + "\n" + q}, {"role": "assistant", "content": a}], image)
            for q, a, image in rows]


def write_parquet(path: str, rows: list[tuple[list[dict], bytes]], **columns: list) -> None:
    """(conversation, encoded image) rows -> a parquet file in the original layout (`conversations` as JSON text,
    `image_bytes`), with any extra columns; an image asked about several times is stored once (parquet's dictionary
    encoding, its page allowed up to 1 GiB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"conversations": [json.dumps(c, ensure_ascii=False) for c, _ in rows],
                      "image_bytes": pa.array([image for _, image in rows], type=pa.binary()), **columns})
    pq.write_table(table, path, dictionary_pagesize_limit=1 << 30)


def _parquet_rows(path: str, text_only: bool = False) -> Iterator[dict]:
    """The file's rows as dicts (only the text columns when `text_only`); ValueError for a file that is not parquet
    or has no column of text."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from err
    try:
        reader = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid or OSError for a damaged or non-parquet file
        raise ValueError(f"cannot read parquet file {path}: {err}") from None
    names = reader.schema_arrow.names
    if not set(TEXT_FIELDS) & set(names):
        raise ValueError(f"parquet file {path} has no 'conversations' or 'text' column (columns: {names})")
    columns = [name for name in names if name in TEXT_FIELDS] if text_only else None
    for batch in reader.iter_batches(batch_size=1024, columns=columns):
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
    value = next((raw[k] for k in IMAGE_FIELDS if raw.get(k) is not None), None)
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


def check_conversation(record: dict) -> None:
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
