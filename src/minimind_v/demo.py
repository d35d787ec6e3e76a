"""`minimind-v demo`: train a VLM end to end on a CPU with what registry packages ship, nothing downloaded.

    easy-vqa (4,000 train images, 13 answers) + 4,000 shapes drawn here (render.py: other sizes, aspect ratios,
    rotations, backgrounds, antialiasing, blur, JPEG, colour noise) [+ the visual world's scenes, `--size world`]
    ->  tokenizer  ->  pretrain-llm on the questions and answers  ->  pretrain-vlm on each image's caption (projector
    only)  ->  sft on the questions  ->  exact match on easy-vqa's test split, on held-out renders and on shapes drawn
    by another rasteriser (matplotlib), with blind and shuffled baselines [and the world's skills and captions]
    ->  answers about sample images written to <out>/samples and about real photos (scikit-image's)

The vision tower is the ImageNet-pretrained EfficientNet-Lite0 (frozen, multiscale tokens); its features are computed
once per image and cached on disk, so later epochs and stages never run it again - the drawn training images too.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from dataclasses import dataclass

from .device import pick_device
from .evaluate import (QAItem, caption_scores, evaluate, evaluate_with_baselines, generate_answers,
                       load_qa_jsonl, report_table, score)
from .data.records import qa_conversations, write_parquet
from .data.render import COLORS
from .data.world import names_held_out
from .data.world_questions import DESCRIBE
from .models.efficientnet import EFFICIENTNET_MULTISCALE, MULTISCALE_WIDTH
from .models.image_features import ImageFeatures, bytes_key, tower_id
from .models.vision_tower import to_rgb

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


@dataclass
class DemoSize:
    """How big and how long: `default` (easy-vqa's skills), `world` (and the visual world's), `world-large` (the
    same with 64 visual tokens and more scenes: a GPU's), `quick` (CI's reduced chain)."""
    preset: dict
    vocab_size: int = 512
    llm_epochs: int = 1
    vlm_epochs: int = 1
    sft_epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    limit: int | None = None  # train questions used (None: all 38,575); test questions likewise
    renders: int = 4000  # training images drawn by render.py (Style.train()), 6 questions each
    eval_renders: int = 500  # images of each drawn evaluation set
    world: int = 0  # training scenes of the visual world (world.py); 0: easy-vqa's skills only
    world_test: int = 400
    max_seq_len: int = 128
    packing: bool = False  # packed rows in every stage (pays where lengths vary; easy-vqa's hardly do)
    share_prefix: int = 0  # sft: an image's questions this many at a time in one step, prompt and image computed once


MODEL = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=384, max_position_embeddings=512, image_token_len=16, ve_hidden_size=MULTISCALE_WIDTH,
             projector_type="mlp", vision_tower_kind="efficientnet")
SIZES = {
    "default": DemoSize(preset=MODEL, sft_epochs=5),
    # easy-vqa and the visual world's skills (counting, relations, binding, existence, reading, captions)
    "world": DemoSize(preset=MODEL, world=26000, packing=True, share_prefix=4),
    # the world with 64 visual tokens (the tower at 256 px) and 40,000 scenes: every skill higher; for a GPU
    "world-large": DemoSize(preset={**MODEL, "image_token_len": 64}, world=40000, max_seq_len=192, packing=True,
                            share_prefix=4),
    # CI's reduced chain: every stage and every evaluation (a small world included), in a few minutes
    "quick": DemoSize(preset=MODEL, sft_epochs=1, batch_size=16, limit=256, renders=40, eval_renders=20, world=30,
                      world_test=20, packing=True, share_prefix=4),
}


def question_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "color" if answer in COLORS else "shape"


def drawn_items(kind: str, images: int, seed: int) -> list[QAItem]:
    """Evaluation items on drawn images: "renders" (this renderer, held-out seed) or "shifted" (matplotlib, with
    backgrounds, outlines and shapes no training image has), 6 questions an image."""
    from .data.easy_shapes import make_split, render_single_mpl

    rows = make_split(images, seed, None if kind == "renders" else render_single_mpl)
    return [QAItem("<image>\n" + q, a, [image], qtype=t) for q, a, t, image in rows]


def prepare_data(out: str, size: DemoSize) -> dict[str, str]:
    """Write the three stages' files (easy-vqa's training split, the renders, the world's training scenes) and the
    world's test set; return their paths."""
    from .data.easy_shapes import describe, easy_vqa_split, rendered_rows
    from .data.world import save_world, world_rows

    os.makedirs(out, exist_ok=True)
    rows = easy_vqa_split("train", size.limit) + rendered_rows(size.renders, seed=0)
    answers: dict[bytes, list[str]] = {}
    for _, a, image in rows:
        answers.setdefault(image, []).append(a)
    captions = {image: describe(a) for image, a in answers.items()}
    if size.world:
        world = world_rows(size.world, size.world_test, seed=0)
        save_world(os.path.join(out, "world"), world)  # its test set is what evaluate_demo reads
        train = [(q, a, image) for split, _, q, a, _, image in world if split == "train"]
        captions.update({image: a for q, a, image in train if q == DESCRIBE})
        rows += train
    chats = qa_conversations(rows)
    paths = {name: os.path.join(out, name) for name in ("text.jsonl", "captions.parquet", "sft.parquet")}
    texts: dict[bytes, list[str]] = {}  # pretrain-llm's text: an image's questions and answers, and its caption
    for q, a, image in rows:
        texts.setdefault(image, []).append(f"{q} {a}.")
    with open(paths["text.jsonl"], "w", encoding="utf-8") as f:
        for image, lines in texts.items():
            f.write(json.dumps({"text": " ".join(lines) + f" this image shows {captions[image]}"}) + "\n")
    user = lambda text: {"role": "user", "content": "<image>\n" + text}  # noqa: E731
    write_parquet(paths["captions.parquet"], [([user(DESCRIBE), {"role": "assistant", "content": c}], b)
                                              for b, c in captions.items()])
    write_parquet(paths["sft.parquet"], chats)
    return paths


def test_items(limit: int | None) -> list[QAItem]:
    from PIL import Image

    from .data.easy_shapes import easy_vqa_split

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
                     max_seq_len=size.max_seq_len, log_every=20, feature_cache=kwargs.pop("feature_cache"),
                     overwrite=True, **kwargs)
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


def run_demo(out: str = "minimind-v-demo", size_name: str | DemoSize = "default", echo=print) -> dict:
    """The whole chain; returns the evaluation report (also written to <out>/report.json)."""
    if not isinstance(size_name, DemoSize) and size_name not in SIZES:
        raise ValueError(f"unknown demo size {size_name!r}; choose one of {', '.join(SIZES)}")
    size, start = size_name if isinstance(size_name, DemoSize) else SIZES[size_name], time.time()
    echo(f"[demo] preparing easy-vqa data, {size.renders} drawn images"
         f"{f' and {size.world} world scenes' if size.world else ''} in {out}/data")
    paths = prepare_data(os.path.join(out, "data"), size)
    model_dir = train_chain(out, size, paths, echo)
    report = evaluate_demo(out, model_dir, size, echo)
    report["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    echo(f"[demo] done in {report['seconds']} s; model {model_dir}, report {out}/report.json, "
         f"loss curves {out}/*/loss.png")
    return report


def train_chain(out: str, size: DemoSize, paths: dict[str, str], echo) -> str:
    """Tokenizer, then pretrain-llm -> pretrain-vlm -> sft; -> the final model folder."""
    from .data.tokenizer import train_tokenizer

    with open(paths["text.jsonl"], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokenizer_dir = os.path.join(out, "tokenizer")
    tokenizer = train_tokenizer(texts, size.vocab_size, tokenizer_dir)
    echo(f"[demo] tokenizer ({len(tokenizer)} tokens; at most {size.vocab_size}) -> {tokenizer_dir}")
    # on a GPU, worker processes tokenize while it trains; on a CPU they would only compete with it
    workers = 0 if pick_device().type == "cpu" else min(4, (os.cpu_count() or 2) // 2)
    common = dict(feature_cache=os.path.join(out, "feature_cache"), vision=EFFICIENTNET_MULTISCALE, num_workers=workers,
                  packing=size.packing)
    stages = [("pretrain-llm", paths["text.jsonl"], size.llm_epochs, dict(tokenizer=tokenizer_dir,
                                                                          overrides=size.preset)),
              ("pretrain-vlm", paths["captions.parquet"], size.vlm_epochs, {}),
              ("sft", paths["sft.parquet"], size.sft_epochs, dict(freeze=0, share_prefix=size.share_prefix))]
    previous = None
    for stage, data, epochs, extra in stages:
        stage_out = os.path.join(out, stage)
        summary = train_stage(stage, data, stage_out, size, epochs, from_weight=previous, **common, **extra)
        echo(f"[demo] {stage}: loss {summary.get('loss')} after {summary['steps']} steps, "
             f"{summary['seconds']} s -> {stage_out}/model")
        previous = os.path.join(stage_out, "model")
    return previous


def evaluate_demo(out: str, model_dir: str, size: DemoSize, echo) -> dict:
    """Exact match on easy-vqa's test split and on the drawn sets (held-out renders; the shifted matplotlib set with
    its blind and shuffled baselines), then the world's skills with their baselines and its captions; the easy-vqa
    figures stay at the top of the report."""
    from .build import load_model

    model, tokenizer = load_model(model_dir)
    model = model.eval().to(pick_device())
    features = ImageFeatures(model.vision_tower, os.path.join(out, "feature_cache"),
                             tower_id(model.config, model.vision_tower))
    reports = {"easy-vqa test": evaluate(model, tokenizer, test_items(size.limit), features, batch_size=256,
                                         max_new_tokens=4)}
    memory = ImageFeatures(model.vision_tower, in_memory=True)  # drawn images: the tower once per image
    if size.eval_renders:
        reports["renders"] = evaluate(model, tokenizer, drawn_items("renders", size.eval_renders, seed=1), memory,
                                      batch_size=256, max_new_tokens=4)
        reports["shifted"] = evaluate_with_baselines(model, tokenizer, drawn_items("shifted", size.eval_renders, 2),
                                                     memory, batch_size=256, max_new_tokens=4)
    world = load_qa_jsonl(os.path.join(out, "data", "world", "test.jsonl")) if size.world else []
    if world:
        reports.update(world_reports(model, tokenizer, world, memory, echo))
    for name, r in reports.items():
        details = [f"{t} {v['accuracy']:.4f}" for t, v in r.get("per_type", {}).items()]
        details += [f"BLEU {r['bleu']:.1f}"] if r.get("bleu") is not None else []
        echo(f"[demo] {name} exact match: {r['accuracy']:.4f} ({r['correct']}/{r['total']}); " + ", ".join(details))
        if "baselines" in r:
            echo("\n" + report_table(r) + "\n")
    report = {**reports["easy-vqa test"], "sets": {k: {n: v for n, v in r.items() if n != "examples"}
                                                   for k, r in reports.items()}}
    report["samples"] = sample_answers(model, tokenizer, os.path.join(out, "samples"))
    if world:
        report["samples"] += world_samples(model, tokenizer, world, os.path.join(out, "samples"))
    report["photos"] = photo_answers(model, tokenizer, features)
    for line in report["samples"] + report["photos"]:
        echo(f"[demo] {line}")
    return report


def world_reports(model, tokenizer, items: list[QAItem], memory: ImageFeatures, echo) -> dict:
    """The world's test questions by skill, with baselines; its captions scored by object set and BLEU."""
    skills = [i for i in items if i.qtype != "caption"]
    described = [i for i in items if i.qtype == "caption"]
    reports = {"world": evaluate_with_baselines(model, tokenizer, skills, memory, batch_size=256, max_new_tokens=8,
                                                keep_predictions=True)}
    named = [(i, p["prediction"]) for i, p in zip(skills, reports["world"].pop("predictions")) if p is not None
             and names_held_out(i.question)]  # the compositions training never named, read apart
    if named:
        reports["world, naming a held-out pair"] = score(*zip(*named))
    predictions = generate_answers(model, tokenizer, described, memory, batch_size=256, max_new_tokens=48)
    reports["world captions (object set)"] = caption_scores([i.answer for i in described], predictions)
    for item, prediction in list(zip(described, predictions))[:4]:
        echo(f"[demo] caption of a held-out scene: {prediction!r} (truth: {item.answer!r})")
    return reports


def world_samples(model, tokenizer, world: list[QAItem], folder: str, scenes: int = 3) -> list[str]:
    """Copy a few held-out world scenes (of the world's test items) to `folder` (images to try `minimind-v chat`
    on) and answer two questions on each: its description and how many shapes it holds."""
    described = [i for i in world if i.qtype == "caption"][:scenes]
    items, paths = [], []
    for number, item in enumerate(described):
        paths.append(os.path.join(folder, f"scene_{number}.png"))
        item.images[0].save(paths[-1])
        items += [QAItem("<image>\n" + DESCRIBE, item.answer, item.images),
                  QAItem("<image>\nhow many shapes are there?", "", item.images)]
    answers = generate_answers(model, tokenizer, items, max_new_tokens=48)
    return [f"sample {path}: {DESCRIBE} -> {answers[2 * n]} (truth {items[2 * n].answer}); how many shapes are "
            f"there? -> {answers[2 * n + 1]}" for n, path in enumerate(paths)]


def sample_answers(model, tokenizer, folder: str) -> list[str]:
    """Write a few shifted renders to `folder` (images to try `minimind-v chat` on) and answer questions on them."""
    from .data.easy_shapes import render_single_mpl

    os.makedirs(folder, exist_ok=True)
    rng, items, paths = random.Random(7), [], []
    for number in range(4):
        image, color, shape = render_single_mpl(rng)
        paths.append(os.path.join(folder, f"shape_{number}.png"))
        image.save(paths[-1])
        items += [QAItem("<image>\nwhat color is the shape?", color, [image]),
                  QAItem("<image>\nwhat shape is in the image?", shape, [image])]
    answers = generate_answers(model, tokenizer, items, max_new_tokens=4)
    return [f"sample {path}: color -> {answers[2 * n]} (truth {items[2 * n].answer}); "
            f"shape -> {answers[2 * n + 1]} (truth {items[2 * n + 1].answer})" for n, path in enumerate(paths)]
