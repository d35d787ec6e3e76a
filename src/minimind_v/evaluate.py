"""Evaluation: generate answers for question/answer items and score exact match on normalised text.

Items come from a JSONL file (`{"question": ..., "answer": ..., "image": path | [paths], "type": ...}`, `<image>`
marking where each image goes; without a marker the image is put before the question), or are built by code (the
demo). Answers are generated greedily by the generation engine in left-padded batches; image features can come
from a feature cache.
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field

from PIL import Image

from .training.features import ImageFeatures, file_key, pixel_key
from .models.vision_tower import to_rgb
from .data.processing import IMAGE_MARKER

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


def load_qa_jsonl(path: str, image_root: str | None = None) -> list[QAItem]:
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question, answer = record["question"], str(record["answer"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: expected a JSON object with question and answer ({err})") from err
            paths = record.get("image") or []
            paths = [paths] if isinstance(paths, str) else paths
            if paths and IMAGE_MARKER not in question:
                question = IMAGE_MARKER * len(paths) + "\n" + question
            full = [os.path.join(image_root, p) if image_root else p for p in paths]
            keys = [file_key(p) for p in full]
            items.append(QAItem(question, answer, [to_rgb(Image.open(p)) for p in full], keys, record.get("type")))
    return items


def generate_answers(model, tokenizer, items: list[QAItem], features: ImageFeatures | None = None,
                     batch_size: int = 64, max_new_tokens: int = 16) -> list[str]:
    """Greedy answers, `batch_size` questions at a time, through the generation engine (left padding, KV cache);
    image features come from `features` (a feature cache) when given."""
    from .generation import Engine, GenerationRequest, SamplingParams

    engine, params, answers = Engine(model, tokenizer, features), SamplingParams(max_new_tokens=max_new_tokens), []
    for start in range(0, len(items), batch_size):
        requests = [GenerationRequest(messages=[{"role": "user", "content": item.question}], images=item.images,
                                      params=params, image_keys=item.image_keys or [pixel_key(i) for i in item.images])
                    for item in items[start:start + batch_size]]
        answers += [result.text.strip() for result in engine.generate(requests)]
    return answers


def score(items: list[QAItem], predictions: list[str]) -> dict:
    """Exact-match accuracy overall and per question type."""
    per_type: dict[str, list[int]] = {}
    correct = 0
    for item, prediction in zip(items, predictions, strict=True):
        hit = normalize_answer(prediction) == normalize_answer(item.answer)
        correct += hit
        if item.qtype is not None:
            per_type.setdefault(item.qtype, [0, 0])
            per_type[item.qtype][0] += hit
            per_type[item.qtype][1] += 1
    report = {"accuracy": correct / max(1, len(items)), "correct": correct, "total": len(items)}
    if per_type:
        report["per_type"] = {t: {"accuracy": c / n, "total": n} for t, (c, n) in sorted(per_type.items())}
    return report


def evaluate(model, tokenizer, items: list[QAItem], features: ImageFeatures | None = None, batch_size: int = 64,
             max_new_tokens: int = 16) -> dict:
    was_training = model.training
    model.eval()
    try:
        predictions = generate_answers(model, tokenizer, items, features, batch_size, max_new_tokens)
    finally:
        model.train(was_training)
    return {**score(items, predictions), "examples": [
        {"question": re.sub(r"(<image>)+", "<image>", i.question), "answer": i.answer, "prediction": p}
        for i, p in list(zip(items, predictions))[:5]]}
