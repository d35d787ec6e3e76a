"""Evaluation: generate answers for question/answer items and score exact match on normalised text.

Items come from a JSONL file (`{"question": ..., "answer": ..., "image": path | [paths], "type": ...}`, `<image>`
marking where each image goes; without a marker the image is put before the question), or are built by code (the
demo). Answers are generated greedily by the generation engine in left-padded batches; image features can come
from a feature cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import string
from dataclasses import dataclass, field

from PIL import Image

from .config import IMAGE_MARKER
from .data.images import DEFAULT_LIMITS, ImageLimits, load_image
from .data.skips import BAD_JSON, BAD_RECORD, SkipRecord, SkipStats
from .models.image_features import ImageFeatures, pixel_key

UNUSABLE_PROMPT = "question the model cannot take"

_PUNCTUATION = set(string.punctuation) | set("。，！？；：“”‘’（）、")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


@dataclass
class QAItem:
    question: str  # with `<image>` markers
    answer: str
    images: list[Image.Image] = field(default_factory=list)
    image_keys: list[str] = field(default_factory=list)
    qtype: str | None = None


def load_eval_items(path: str, image_root: str | None = None, stats: SkipStats | None = None,
                    limits: ImageLimits = DEFAULT_LIMITS) -> list[QAItem]:
    """The items of an evaluation file: a question/answer JSONL (`load_qa_jsonl`), or any file training reads
    (MiniMind-V parquet, LLaVA JSON/JSONL: `data/records.py`), each conversation's first question and the answer to
    it, image paths resolved the same way (against `image_root`, by default the data file's folder)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation data {path!r} does not exist")
    if path.lower().endswith(".jsonl") and _first_record_has(path, "question"):
        return load_qa_jsonl(path, image_root, stats, limits)
    from .data.records import iter_records

    stats = stats if stats is not None else SkipStats()
    items = []
    for number, record in enumerate(iter_records(path, image_root, stats), 1):
        try:
            items.append(_conversation_item(record, limits))
        except SkipRecord as skip:
            stats.add(skip.reason, f"{path} record {number}: {skip.detail}")
    if not items:
        raise ValueError(f"{path} holds no usable question/answer item ({stats.summary()})")
    return items


def _first_record_has(path: str, key: str) -> bool:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    return True  # the question/answer reader counts it as bad JSON
                return isinstance(record, dict) and key in record
    return True


def _conversation_item(record: dict, limits: ImageLimits) -> QAItem:
    """A training record -> its first user turn as the question, the assistant turn after it as the answer."""
    turns = record.get("conversations") or []
    users = [n for n, t in enumerate(turns) if t["role"] == "user"]
    if not users or users[0] + 1 >= len(turns) or turns[users[0] + 1]["role"] != "assistant":
        raise SkipRecord(BAD_RECORD, "no user turn answered by an assistant turn")
    question, answer, images = turns[users[0]]["content"], turns[users[0] + 1]["content"], record.get("images") or []
    if images and IMAGE_MARKER not in question:
        question = IMAGE_MARKER * len(images) + "\n" + question
    loaded = [load_image(image, limits) for image in images]
    return QAItem(question, answer, [image for image, _ in loaded], [key for _, key in loaded])


def load_qa_jsonl(path: str, image_root: str | None = None, stats: SkipStats | None = None,
                  limits: ImageLimits = DEFAULT_LIMITS) -> list[QAItem]:
    """The items of a question/answer JSONL. A bad line is skipped and counted in `stats` with its file and line
    (not JSON, not an object, a question that is not text, no answer, an image field that is not a path or a list of
    paths, an image that is missing, corrupt or over the limits); a file with no usable item is an error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation data {path!r} does not exist")
    stats = stats if stats is not None else SkipStats()
    image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            stats.total += 1
            try:
                items.append(_qa_item(line, image_root, limits))
            except SkipRecord as skip:
                stats.add(skip.reason, f"{path}:{number}: {skip.detail}")
    if not items:
        raise ValueError(f"{path} holds no usable question/answer item ({stats.summary()})")
    return items


def _qa_item(line: bytes, image_root: str | None, limits: ImageLimits) -> QAItem:
    try:
        record = json.loads(line)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise SkipRecord(BAD_JSON, str(err)) from None
    if not isinstance(record, dict):
        raise SkipRecord(BAD_RECORD, f"expected a JSON object, got {type(record).__name__}")
    question, answer, paths = record.get("question"), record.get("answer"), record.get("image") or []
    if not isinstance(question, str) or not question.strip():
        raise SkipRecord(BAD_RECORD, f"'question' must be non-empty text, got {question!r:.60}")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise SkipRecord(BAD_RECORD, f"'answer' must be text or a number, got {answer!r:.60}")
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise SkipRecord(BAD_RECORD, f"'image' must be a path or a list of paths, got {paths!r:.60}")
    if paths and IMAGE_MARKER not in question:
        question = IMAGE_MARKER * len(paths) + "\n" + question
    loaded = [load_image(os.path.join(image_root, p), limits) for p in paths]
    qtype = record.get("type")
    return QAItem(question, str(answer), [image for image, _ in loaded], [key for _, key in loaded],
                  qtype if isinstance(qtype, str) else None)


def generate_answers(model, tokenizer, items: list[QAItem], features: ImageFeatures | None = None,
                     batch_size: int = 64, max_new_tokens: int = 16, stats: SkipStats | None = None,
                     progress: str | None = None) -> list[str | None]:
    """Greedy answers, `batch_size` questions at a time, through the generation engine (left padding, KV cache);
    image features come from `features` (a feature cache) when given. A question the model cannot take (over its
    context, images that do not match its `<image>` markers) gets None and is counted in `stats`. `progress`: a
    progress bar with this title (on stderr)."""
    from tqdm import tqdm

    from .generation import Engine, GenerationRequest, SamplingParams

    engine, params, answers = Engine(model, tokenizer, features), SamplingParams(max_new_tokens=max_new_tokens), []
    keys = [item.image_keys or [pixel_key(i) for i in item.images] for item in items]
    if features is not None:  # a cache: every image through the tower first, in full chunks
        features.add([image for item in items for image in item.images], [k for ks in keys for k in ks])
    for start in tqdm(range(0, len(items), batch_size), desc=progress, unit="batch", disable=progress is None):
        requests = [GenerationRequest(messages=[{"role": "user", "content": item.question}], images=item.images,
                                      params=params, image_keys=item_keys)
                    for item, item_keys in zip(items[start:start + batch_size], keys[start:start + batch_size])]
        usable = [_takes(engine, request, f"item {number}", stats)
                  for number, request in enumerate(requests, start + 1)]
        results = iter(engine.generate([r for r, ok in zip(requests, usable) if ok]) if any(usable) else ())
        answers += [next(results).text.strip() if ok else None for ok in usable]
    return answers


def _takes(engine, request, where: str, stats: SkipStats | None) -> bool:
    """Whether the engine accepts the request; a refusal is counted (with its reason) in `stats`."""
    from .generation import RequestError

    try:
        engine.encode(request)
        return True
    except RequestError as err:
        (stats if stats is not None else SkipStats()).add(UNUSABLE_PROMPT, f"{where}: {err}")
        return False


def score(items: list[QAItem], predictions: list[str | None]) -> dict:
    """Exact-match accuracy overall and per question type, over the items that got an answer (None: skipped)."""
    per_type: dict[str, list[int]] = {}
    correct = 0
    answered = [(item, p) for item, p in zip(items, predictions, strict=True) if p is not None]
    for item, prediction in answered:
        hit = normalize_answer(prediction) == normalize_answer(item.answer)
        correct += hit
        if item.qtype is not None:
            per_type.setdefault(item.qtype, [0, 0])
            per_type[item.qtype][0] += hit
            per_type[item.qtype][1] += 1
    report = {"accuracy": correct / max(1, len(answered)), "correct": correct, "total": len(answered)}
    if per_type:
        report["per_type"] = {t: {"accuracy": c / n, "total": n} for t, (c, n) in sorted(per_type.items())}
    return report


def evaluate(model, tokenizer, items: list[QAItem], features: ImageFeatures | None = None, batch_size: int = 64,
             max_new_tokens: int = 16, stats: SkipStats | None = None, progress: str | None = None,
             keep_predictions: bool = False) -> dict:
    """Score the items; `stats` (the loading's skips, if any) gains the questions the model could not take and
    its summary goes into the report. "examples": five answers, the wrong ones first; `keep_predictions`: every
    item's answer too ("predictions", None where it was skipped)."""
    was_training = model.training
    model.eval()
    stats = stats if stats is not None else SkipStats()
    try:
        predictions = generate_answers(model, tokenizer, items, features, batch_size, max_new_tokens, stats,
                                       progress)
    finally:
        model.train(was_training)
    if all(p is None for p in predictions):
        raise ValueError(f"no question could be asked: {stats.summary()}")
    answered = [prediction_record(i, p) for i, p in zip(items, predictions) if p is not None]
    report = {**score(items, predictions), "skipped": stats.summary(),
              "examples": sorted(answered, key=lambda r: r["correct"])[:5]}
    if keep_predictions:
        report["predictions"] = [None if p is None else prediction_record(i, p) for i, p in zip(items, predictions)]
    return report


def prediction_record(item: QAItem, prediction: str) -> dict:
    """One answer as the report and `eval --output` show it."""
    return {"question": re.sub(r"(<image>)+", "<image>", item.question), "answer": item.answer,
            "prediction": prediction, "correct": normalize_answer(prediction) == normalize_answer(item.answer),
            **({"type": item.qtype} if item.qtype else {})}


def baseline_items(items: list[QAItem], kind: str, seed: int = 0) -> list[QAItem]:
    """The same questions without the right image: "blind" shows a blank mid-grey image of the same size, "shuffled"
    another image of the set (never the item's own: images are dealt out again by a seeded derangement)."""
    if kind == "blind":
        return [dataclasses.replace(item, images=[Image.new("RGB", image.size, (128, 128, 128))
                                                  for image in item.images], image_keys=[]) for item in items]
    if kind != "shuffled":
        raise ValueError(f"unknown baseline {kind!r}: blind or shuffled")
    distinct = list({id(image): image for item in items for image in item.images}.values())
    if len(distinct) < 2:
        raise ValueError("a shuffled baseline needs at least two different images")
    order = list(range(len(distinct)))
    random.Random(seed).shuffle(order)
    dealt = {id(distinct[order[k]]): distinct[order[(k + 1) % len(order)]] for k in range(len(order))}
    return [dataclasses.replace(item, images=[dealt[id(image)] for image in item.images], image_keys=[])
            for item in items]


def evaluate_with_baselines(model, tokenizer, items: list[QAItem], features: ImageFeatures | None = None,
                            batch_size: int = 64, max_new_tokens: int = 16, stats: SkipStats | None = None,
                            progress: bool = False, keep_predictions: bool = False) -> dict:
    """`evaluate`, then the same questions blind and shuffled: per question type, the accuracy, both baselines and
    the margin over the better of them (a skill the model learned from the image has a wide margin). Without
    `features`, the tower runs once per distinct image (features kept in memory)."""
    features = features if features is not None else ImageFeatures(model.vision_tower, in_memory=True)
    report = evaluate(model, tokenizer, items, features, batch_size, max_new_tokens, stats,
                      "model" if progress else None, keep_predictions)
    report["baselines"] = {kind: {k: v for k, v in evaluate(model, tokenizer, baseline_items(items, kind), features,
                                                             batch_size, max_new_tokens,
                                                             progress=kind if progress else None).items()
                                  if k in ("accuracy", "per_type")} for kind in ("blind", "shuffled")}
    blind, shuffled = report["baselines"]["blind"], report["baselines"]["shuffled"]
    for qtype, row in report.get("per_type", {}).items():
        row["blind"] = blind["per_type"][qtype]["accuracy"]
        row["shuffled"] = shuffled["per_type"][qtype]["accuracy"]
        row["margin"] = row["accuracy"] - max(row["blind"], row["shuffled"])
    return report


def report_table(report: dict) -> str:
    """The report's accuracy per question type as a Markdown table (with the baselines when it has them)."""
    rows = report.get("per_type") or {"all": {"accuracy": report["accuracy"], "total": report["total"]}}
    baselines = "baselines" in report
    head = "| type | n | accuracy |" + (" blind | shuffled | margin |" if baselines else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, row in rows.items():
        cells = [name, str(row["total"]), f"{row['accuracy']:.2%}"]
        if baselines:
            cells += [f"{row['blind']:.2%}", f"{row['shuffled']:.2%}", f"{row['margin'] * 100:+.1f} pt"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def caption_scores(references: list[str], predictions: list[str | None]) -> dict:
    """Generated scene descriptions against the true ones: the share naming exactly the scene's objects (colour and
    kind, in any order: world.caption_objects) and corpus BLEU (sacrebleu, when installed)."""
    from .data.world import caption_objects

    pairs = [(r, p) for r, p in zip(references, predictions, strict=True) if p is not None]
    exact = sum(caption_objects(p) == caption_objects(r) for r, p in pairs)
    report = {"accuracy": exact / max(1, len(pairs)), "correct": exact, "total": len(pairs)}
    try:
        import sacrebleu
    except ImportError:
        report["bleu"] = None
    else:
        report["bleu"] = sacrebleu.corpus_bleu([p for _, p in pairs], [[r for r, _ in pairs]]).score
    return report
