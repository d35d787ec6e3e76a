"""A seeded visual world: scenes of 1-6 coloured objects (or a written word), with questions, answers and a caption.

    skills      count ("how many red shapes are there?"), relation ("what is left of the blue circle?", "is the star
                above the square?"), binding ("what color is the triangle?" among distractors), existence (POPE's
                random / popular / adversarial negatives), reading ("what word is written?"), caption
    objects     circle rectangle triangle star heart arrow, in render.py's eight colour names; a scene never holds
                two objects of one colour and kind, so "the red star" names one object
    splits      `held_out` colour-kind pairs never appear in training scenes, and test scenes add backgrounds that
                training never shows (gradient, noise): generalisation is measured, not memorisation

`world_rows(...)` generates the rows; `save_world(folder, rows)` (or `write_world`, both at once) writes
`train.parquet` (the project's conversation layout, a `skill` column beside) and `test.jsonl` + `images/` (what
`minimind-v eval` reads, the skill as the question type).
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .records import qa_conversations, write_parquet
from .render import (COLORS, FONTS, Style, canvas, degrade, draw_shape, draw_text, encode_png, enlarge, on_every_core,
                     sample_color, shrink)

KINDS = ("circle", "rectangle", "triangle", "star", "heart", "arrow")
PLURAL = {"circle": "circles", "rectangle": "rectangles", "triangle": "triangles", "star": "stars",
          "heart": "hearts", "arrow": "arrows"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
WORDS = ("cat", "dog", "sun", "red", "box", "map", "cup", "key", "pen", "sky", "tree", "fish", "bird", "book", "star",
         "moon", "rain", "road", "ship", "lamp", "door", "hand", "milk", "rose", "frog", "apple", "house", "green",
         "water", "light", "smile", "train", "plant", "bread", "clock", "river", "chair", "cloud", "table", "music",
         "garden", "planet", "window", "yellow", "orange", "flower", "rocket", "pencil", "silver", "summer")
# colour-kind pairs that only test scenes show
HELD_OUT = (("red", "star"), ("blue", "heart"), ("green", "triangle"), ("yellow", "arrow"), ("teal", "circle"),
            ("brown", "rectangle"), ("gray", "star"), ("black", "heart"))
TRAIN_STYLE = Style(sizes=(128, 256), backgrounds=("white", "tint", "two-tone"), pure_colors=False,
                    supersample=(1, 2), blur=0.01, jpeg=(50, 95), noise=6.0)
TEST_STYLE = Style(sizes=(128, 256), backgrounds=("white", "tint", "two-tone", "gradient", "noise"),
                   pure_colors=False, supersample=(1, 4), blur=0.01, jpeg=(50, 95), noise=6.0)


@dataclass(frozen=True)
class Thing:
    kind: str
    color: str
    x: float  # centre, as a fraction of the canvas width (0 left, 1 right)
    y: float  # and height (0 top, 1 bottom)
    r: float  # radius, as a fraction of the shorter side

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    word: str | None = None  # a written word, when the scene is for reading
    word_color: str = "black"


def sample_scene(rng: random.Random, split: str, reading: bool = False) -> Scene:
    """1-6 objects, none overlapping, no colour-kind pair twice; held-out pairs only in the test split (where half
    the scenes have one). A reading scene is a word with 0-2 small objects."""
    seen = [(c, k) for c in COLORS for k in KINDS if (c, k) not in HELD_OUT]
    count = rng.randint(0, 2) if reading else rng.choices(range(1, 7), weights=(2, 3, 3, 3, 3, 3))[0]
    chosen = rng.sample(seen, count)
    if split == "test" and count and rng.random() < 0.5:
        chosen[0] = rng.choice(HELD_OUT)
        chosen = list(dict.fromkeys(chosen))
    things: list[Thing] = []
    for color, kind in chosen:
        for _ in range(50):  # a free spot
            r = rng.uniform(0.06, 0.1) if reading or count > 3 else rng.uniform(0.07, 0.14)
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02), rng.uniform(r + 0.02, 1 - r - 0.02)
            if reading and 0.3 < y < 0.7:
                continue  # the word's band
            if all((x - t.x) ** 2 + (y - t.y) ** 2 > (r + t.r + 0.04) ** 2 for t in things):
                things.append(Thing(kind, color, x, y, r))
                break
    if not reading:
        return Scene(tuple(things))
    return Scene(tuple(things), rng.choice(WORDS), rng.choice([c for c in COLORS if c not in ("yellow", "gray")]))


def render_scene(scene: Scene, style: Style, rng: random.Random) -> Image.Image:
    """The scene on a square canvas of the style, degraded as it allows."""
    image = canvas(style, rng)
    side = min(image.size)
    scale = rng.choice(style.supersample)
    big = enlarge(image, scale)
    draw = ImageDraw.Draw(big)
    for thing in scene.things:
        box = (thing.x * image.width, thing.y * image.height, thing.r * side)
        draw_shape(draw, thing.kind, box, sample_color(thing.color, rng, style.pure_colors),
                   rng.uniform(-15, 15), None, rng, scale)
    if scene.word:
        height = side * rng.uniform(0.09, 0.13)
        draw_text(big, scene.word, (image.width * rng.uniform(0.45, 0.55), image.height * 0.5, height),
                  sample_color(scene.word_color, rng, style.pure_colors), rng.uniform(-8, 8), rng.choice(FONTS),
                  scale)
    image = shrink(big, scale)
    return degrade(image, style, rng)


def caption(scene: Scene) -> str:
    """'a red circle, a blue star and a green triangle.' (left to right); the word for a reading scene."""
    if scene.word:
        return f'the word "{scene.word}" written in {scene.word_color}.'
    names = [f"a {t.name}" for t in sorted(scene.things, key=lambda t: t.x)]
    return (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + "."


def caption_objects(text: str) -> tuple:
    """What a description names: the sorted (colour, kind) pairs of "a red circle, a blue star ...", or the quoted
    word of a reading scene."""
    import re

    word = re.search(r'"([^"]*)"', text)
    if word:
        return ("word", word.group(1))
    pairs = re.findall(r"\b(" + "|".join(COLORS) + r") (" + "|".join(KINDS) + r")s?\b", text.lower())
    return tuple(sorted(pairs))


def names_held_out(text: str) -> bool:
    """Whether a question or answer names a held-out colour-kind pair ("is there a red star?")."""
    return any(f"{color} {kind}" in text.lower() for color, kind in HELD_OUT)


def world_rows(train_scenes: int, test_scenes: int, seed: int = 0, reading: float = 0.3,
               workers: int | None = None) -> list[tuple]:
    """(split, scene number, question, answer, skill, PNG bytes) of a seeded world; `reading`: the share of
    reading scenes (reading one word of fifty needs more examples than the other skills). Each training scene has
    its own seed, so they are drawn on `workers` processes (default: one a core) and are the same for any number of
    them; the test scenes come from one stream of their own, the same for any training size."""
    if not 0 <= reading <= 1 or train_scenes < 0 or test_scenes < 0:
        raise ValueError(f"the share of reading scenes must be in [0, 1] (got {reading}) and the scene counts at "
                         f"least 0 (got {train_scenes}, {test_scenes})")
    draw = functools.partial(training_scene, seed, reading)
    drawn = on_every_core(draw, list(range(train_scenes)), workers)  # each scene from its own seed
    rng = random.Random(f"test:{seed}")
    drawn += [scene_rows("test", number, rng, reading) for number in range(test_scenes)]
    return [row for rows in drawn for row in rows]


def training_scene(seed: int, reading: float, number: int) -> list[tuple]:
    """Training scene `number` of `world_rows(..., seed, reading)`, drawn from its own seed, with its rows."""
    return scene_rows("train", number, random.Random(f"train:{seed}:{number}"), reading)


def scene_rows(split: str, number: int, rng: random.Random, reading: float) -> list[tuple]:
    """A scene of `split` drawn from `rng` (a word to read with probability `reading`), rendered, with its rows."""
    from .world_questions import questions

    scene = sample_scene(rng, split, reading=rng.random() < reading)
    data = encode_png(render_scene(scene, TRAIN_STYLE if split == "train" else TEST_STYLE, rng))
    return [(split, number, q, a, skill, data) for q, a, skill in questions(scene, rng, split == "train")]


def save_world(folder: str, rows: list[tuple]) -> dict:
    """train.parquet (conversations, image_bytes, skill) and test.jsonl + images/; -> counts per split and skill."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    train = [r for r in rows if r[0] == "train"]
    chats = qa_conversations([(q, a, data) for _, _, q, a, _, data in train])
    write_parquet(os.path.join(folder, "train.parquet"), chats, skill=[r[4] for r in train])
    _write_test(folder, [r for r in rows if r[0] == "test"])
    counts = Counter(f"{split} {skill}" for split, _, _, _, skill, _ in rows)
    return dict(sorted(counts.items()))


def write_world(folder: str, train_scenes: int, test_scenes: int, seed: int = 0, reading: float = 0.3) -> dict:
    """`minimind-v world`: generate and save; -> counts per split and skill."""
    return save_world(folder, world_rows(train_scenes, test_scenes, seed, reading))


def _write_test(folder: str, rows: list) -> None:
    with open(os.path.join(folder, "test.jsonl"), "w", encoding="utf-8") as f:
        for _, number, q, a, skill, data in rows:
            name = f"images/test_{number:05d}.png"
            if not os.path.isfile(os.path.join(folder, name)):
                with open(os.path.join(folder, name), "wb") as image:
                    image.write(data)
            f.write(json.dumps({"question": "<image>\n" + q, "answer": a, "image": name, "type": skill}) + "\n")
