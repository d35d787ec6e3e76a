"""`minimind-v demo`: train a VLM end to end on a CPU with what registry packages ship, nothing downloaded.

    easy-vqa (4,000 train / 1,000 test shape images, 13 answers)  ->  tokenizer  ->  pretrain-llm on the demo's text
    ->  pretrain-vlm on captions derived from each image's answers (projector only)  ->  sft on the questions
    ->  exact-match evaluation on the test split  ->  a few answers about real photos (scikit-image's samples)

The vision tower is the ImageNet-pretrained EfficientNet-Lite0 (frozen); its features are computed once per image and
cached on disk, so later epochs and stages never run it again.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .device import pick_device
from .evaluate import QAItem, evaluate
from .models.image_features import ImageFeatures, bytes_key, tower_id
from .models.vision_tower import to_rgb

COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
SHAPES = {"circle", "rectangle", "triangle"}
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


@dataclass
class DemoSize:
    """How big and how long: the default meets the 10-minute CPU target, `large` the 99% target; `quick` is CI's
    reduced chain."""
    preset: dict
    vocab_size: int = 512
    llm_epochs: int = 1
    vlm_epochs: int = 1
    sft_epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    limit: int | None = None  # train questions used (None: all 38,575); test questions likewise


MODEL = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=384, max_position_embeddings=512, image_token_len=16, ve_hidden_size=1280,
             projector_type="mlp", vision_tower_kind="efficientnet")
SIZES = {
    "default": DemoSize(preset=MODEL),
    # the same model on EfficientNet's full 7x7 grid (224 px input) and longer training: >= 99% on easy-vqa
    "large": DemoSize(preset={**MODEL, "image_token_len": 49}, vlm_epochs=4, sft_epochs=8),
    "quick": DemoSize(preset=MODEL, sft_epochs=1, batch_size=16, limit=256),  # CI's reduced run
}


def question_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "color" if answer in COLORS else "shape"


def easy_vqa_split(split: str, limit: int | None) -> list[tuple[str, str, bytes]]:
    """(question, answer, PNG bytes) of a split, in the package's order."""
    import easy_vqa

    questions, answers, image_ids = (easy_vqa.get_train_questions() if split == "train"
                                     else easy_vqa.get_test_questions())
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    images: dict[int, bytes] = {}
    rows = []
    for q, a, i in list(zip(questions, answers, image_ids))[:limit]:
        if i not in images:
            with open(paths[i], "rb") as f:
                images[i] = f.read()
        rows.append((q, a, images[i]))
    return rows


def caption(answers: list[str]) -> str:
    """'a blue circle.' from an image's answers (every easy-vqa image shows one shape)."""
    color = next((a for a in answers if a in COLORS), None)
    shape = next((a for a in answers if a in SHAPES), "shape")
    return f"a {color + ' ' if color else ''}{shape}."


def write_parquet(path: str, rows: list[tuple[list[dict], bytes]]) -> None:
    table = pa.table({"conversations": [json.dumps(c, ensure_ascii=False) for c, _ in rows],
                      "image_bytes": pa.array([b for _, b in rows], type=pa.binary())})
    pq.write_table(table, path)


def prepare_data(out: str, limit: int | None) -> dict[str, str]:
    """Write the three stages' files; return their paths."""
    os.makedirs(out, exist_ok=True)
    train = easy_vqa_split("train", limit)
    by_image: dict[bytes, list[str]] = {}
    for _, a, image in train:
        by_image.setdefault(image, []).append(a)
    captions = {image: caption(answers) for image, answers in by_image.items()}
    paths = {name: os.path.join(out, name) for name in ("text.jsonl", "captions.parquet", "sft.parquet")}
    with open(paths["text.jsonl"], "w", encoding="utf-8") as f:
        for q, a, image in train:
            f.write(json.dumps({"text": f"{q} {a}. this image shows {captions[image]}"}) + "\n")
    user = lambda text: {"role": "user", "content": "<image>\n" + text}  # noqa: E731
    write_parquet(paths["captions.parquet"], [([user("describe the image."), {"role": "assistant", "content": c}], b)
                                              for b, c in captions.items()])
    write_parquet(paths["sft.parquet"], [([user(q), {"role": "assistant", "content": a}], b) for q, a, b in train])
    return paths


def test_items(limit: int | None) -> list[QAItem]:
    from PIL import Image

    decoded: dict[bytes, object] = {}
    items = []
    for q, a, image in easy_vqa_split("test", limit):
        if image not in decoded:
            decoded[image] = to_rgb(Image.open(io.BytesIO(image)))
        items.append(QAItem("<image>\n" + q, a, [decoded[image]], [bytes_key(image)], question_type(a)))
    return items


def train_stage(stage: str, data: str, out: str, size: DemoSize, epochs: int, **kwargs) -> dict:
    from .training.trainer import TrainArgs, Trainer

    args = TrainArgs(stage=stage, data=data, out_dir=out, epochs=epochs, batch_size=size.batch_size, lr=size.lr,
                     max_seq_len=128, log_every=20, feature_cache=kwargs.pop("feature_cache"), overwrite=True, **kwargs)
    return Trainer(args).run()


def photo_answers(model, tokenizer, features: ImageFeatures) -> list[str]:
    """A qualitative look: what the model says about real photos it never saw (and is not trained for)."""
    from PIL import Image
    from skimage import data as samples

    lines = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(samples, name)())
        items = [QAItem("<image>\n" + q, "", [to_rgb(image)]) for q in
                 ("what color is the shape?", "what shape is in the image?")]
        answers = evaluate(model, tokenizer, items, features)["examples"]
        lines.append(f"{name}: " + "; ".join(f"{e['question'].split(chr(10))[-1]} -> {e['prediction']}"
                                             for e in answers))
    return lines


def run_demo(out: str = "minimind-v-demo", size_name: str = "default", echo=print) -> dict:
    """The whole chain; returns the evaluation report (also written to <out>/report.json)."""
    from .build import load_model
    from .data.tokenizer import train_tokenizer

    if size_name not in SIZES:
        raise ValueError(f"unknown demo size {size_name!r}; choose one of {', '.join(SIZES)}")
    size, start, cache = SIZES[size_name], time.time(), os.path.join(out, "feature_cache")
    echo(f"[demo] preparing easy-vqa data in {out}/data")
    paths = prepare_data(os.path.join(out, "data"), size.limit)
    with open(paths["text.jsonl"], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokenizer_dir = os.path.join(out, "tokenizer")
    train_tokenizer(texts, size.vocab_size, tokenizer_dir)
    echo(f"[demo] tokenizer ({size.vocab_size} tokens) -> {tokenizer_dir}")
    # on a GPU, worker processes tokenize while it trains; on a CPU they would only compete with it
    workers = 0 if pick_device().type == "cpu" else min(4, (os.cpu_count() or 2) // 2)
    common = dict(feature_cache=cache, vision="efficientnet-lite0", num_workers=workers)
    stages = [("pretrain-llm", paths["text.jsonl"], size.llm_epochs, dict(tokenizer=tokenizer_dir,
                                                                          overrides=size.preset)),
              ("pretrain-vlm", paths["captions.parquet"], size.vlm_epochs, {}),
              ("sft", paths["sft.parquet"], size.sft_epochs, dict(freeze=0))]
    previous = None
    for stage, data, epochs, extra in stages:
        stage_out = os.path.join(out, stage)
        summary = train_stage(stage, data, stage_out, size, epochs, from_weight=previous, **common, **extra)
        echo(f"[demo] {stage}: loss {summary.get('loss')} after {summary['steps']} steps, "
             f"{summary['seconds']} s -> {stage_out}/model")
        previous = os.path.join(stage_out, "model")
    model, tokenizer = load_model(previous)
    model = model.eval().to(pick_device())
    features = ImageFeatures(model.vision_tower, cache, tower_id(model.config, model.vision_tower))
    report = evaluate(model, tokenizer, test_items(size.limit), features, batch_size=256, max_new_tokens=4)
    report["photos"] = photo_answers(model, tokenizer, features)
    report["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    echo(f"[demo] easy-vqa test exact match: {report['accuracy']:.4f} ({report['correct']}/{report['total']}); "
         + ", ".join(f"{t} {r['accuracy']:.4f}" for t, r in report.get("per_type", {}).items()))
    for line in report["photos"]:
        echo(f"[demo] photo {line}")
    echo(f"[demo] done in {report['seconds']} s; model {previous}, report {out}/report.json, "
         f"loss curves {out}/*/loss.png")
    return report
