"""easy-vqa's data, and easy-vqa's questions about images this project draws itself (render.py): one shape of a
named colour per image.

`Style.easy()` imitates easy-vqa's look; `Style.shifted()` draws what easy-vqa never shows (other sizes and aspect
ratios, rotations, backgrounds, antialiasing, blur, JPEG, colour noise). The same 13 answers and 22 question templates
as easy-vqa, so a model trained on easy-vqa can be scored on either, and renders can be added to its training data.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .render import (COLORS, SHAPES, Degradation, Style, canvas, draw_shape, encode_png, enlarge, on_every_core,
                     sample_color, shrink)

STORED_SIDE = 224  # training renders are stored at most this large: the demo towers' largest input side
# easy-vqa's templates: {thing} is "<colour> shape" or a shape name
WHAT_COLOR = ("what color is the {shape}?", "what is the color of the {shape}?")
WHAT_SHAPE = ("what shape is in the image?", "what shape does the image contain?", "what shape is present?",
              "what is the {color} shape?")
IS_THERE = ("is there a {thing}?", "is there a {thing} in the image?", "does the image contain a {thing}?",
            "is a {thing} present?")
IS_NOT = ("is there not a {thing}?", "is there not a {thing} in the image?", "does the image not contain a {thing}?",
          "is no {thing} present?")


def render_single(style: Style, rng: random.Random) -> tuple[Image.Image, str, str]:
    """(image, colour name, shape name): one shape on a canvas of the style, degraded as it allows."""
    image, degradation, color_name, shape = drawn_single(style, rng)
    return degradation.apply(image), color_name, shape


def drawn_single(style: Style, rng: random.Random) -> tuple[Image.Image, Degradation, str, str]:
    """`render_single` before its degradation: (image, the sampled degradation, colour name, shape name)."""
    image = canvas(style, rng)
    color_name, shape = rng.choice(COLORS), rng.choice(SHAPES)
    color = sample_color(color_name, rng, style.pure_colors)
    short = min(image.size)
    r = rng.uniform(0.1, 0.42) * short
    cx, cy = rng.uniform(r, image.width - r), rng.uniform(r, image.height - r)
    scale = rng.choice(style.supersample)
    big = enlarge(image, scale)
    outline = None
    if style.outline and color_name not in ("black", "gray") and rng.random() < style.outline:
        outline = tuple(round(c * 0.45) for c in color)
    angle = rng.uniform(0, 360) if style.rotate else 0.0
    draw_shape(ImageDraw.Draw(big), shape, (cx, cy, r), color, angle, outline, rng, scale)
    return shrink(big, scale), Degradation.sample(style, rng), color_name, shape


def questions(color: str, shape: str, rng: random.Random, count: int = 6) -> list[tuple[str, str, str]]:
    """`count` distinct (question, answer, type) about a one-shape image, types "color", "shape" and "yes/no" as
    easy-vqa mixes them (yes/no questions half true, half false)."""
    pool = [(t.format(shape=s), color, "color") for t in WHAT_COLOR for s in (shape, "shape")]
    pool += [(t.format(color=color), shape, "shape") for t in WHAT_SHAPE]
    for thing_true, thing_false in ((f"{color} shape", f"{rng.choice([c for c in COLORS if c != color])} shape"),
                                    (shape, rng.choice([s for s in SHAPES if s != shape]))):
        for template in IS_THERE:
            pool += [(template.format(thing=thing_true), "yes", "yes/no"),
                     (template.format(thing=thing_false), "no", "yes/no")]
        for template in IS_NOT:
            pool += [(template.format(thing=thing_true), "no", "yes/no"),
                     (template.format(thing=thing_false), "yes", "yes/no")]
    picked = rng.sample(pool, min(count, len(pool)))
    return sorted(set(picked), key=picked.index)


def easy_vqa_split(split: str, limit: int | None = None) -> list[tuple[str, str, bytes]]:
    """(question, answer, PNG bytes) of easy-vqa's "train" or "test" split, in the package's order."""
    import easy_vqa

    train = split == "train"
    questions_, answers, image_ids = easy_vqa.get_train_questions() if train else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if train else easy_vqa.get_test_image_paths()
    images: dict[int, bytes] = {}
    rows = []
    for q, a, i in list(zip(questions_, answers, image_ids))[:limit]:
        if i not in images:
            with open(paths[i], "rb") as f:
                images[i] = f.read()
        rows.append((q, a, images[i]))
    return rows


def describe(answers: list[str]) -> str:
    """'a blue circle.' from the answers about one image (every easy-vqa image shows one shape)."""
    color = next((a for a in answers if a in COLORS), None)
    shape = next((a for a in answers if a in SHAPES), "shape")
    return f"a {color + ' ' if color else ''}{shape}."


def color_pair(color: str, rng: random.Random) -> list[tuple[str, str]]:
    """One yes/no template asked of the shape's colour and of another colour: answers that only comparing the
    question's colour with the image's can tell apart."""
    template = rng.choice(IS_THERE + IS_NOT)
    other = rng.choice([c for c in COLORS if c != color])
    truth = "yes" if template in IS_THERE else "no"
    return [(template.format(thing=f"{color} shape"), truth),
            (template.format(thing=f"{other} shape"), "no" if truth == "yes" else "yes")]


def rendered_rows(images: int, seed: int, workers: int | None = None) -> list[tuple[str, str, bytes]]:
    """(question, answer, PNG bytes) of `images` training renders (`Style.train()`), 6 questions each: the first two
    name the colour and the shape (what the image's description is made of), then a `color_pair`, then two of
    `questions`. The images are finished (degraded, shrunk, encoded) on `workers` processes (default: one a core),
    the same for any number of them."""
    rng, drawn, asked = random.Random(seed), [], []
    for _ in range(images):  # the random draws in one stream, in order; the painting after them, on every core
        image, degradation, color, shape = drawn_single(Style.train(), rng)
        drawn.append((image, degradation))
        qa = [(f"what color is the {shape}?", color), ("what shape is in the image?", shape)]
        asked.append(qa + color_pair(color, rng) + [(q, a) for q, a, _ in questions(color, shape, rng, 2)])
    stored = on_every_core(finished_png, drawn, workers)
    return [(q, a, data) for qa, data in zip(asked, stored) for q, a in qa]


def finished_png(drawn: tuple[Image.Image, Degradation]) -> bytes:
    """A drawn render degraded, shrunk to at most STORED_SIDE and encoded (no random draws left)."""
    image = drawn[1].apply(drawn[0])
    image.thumbnail((STORED_SIDE, STORED_SIDE), Image.Resampling.LANCZOS)
    return encode_png(image)


def make_split(images: int, seed: int, draw=None, per_image: int = 6) -> list[tuple[str, str, str, Image.Image]]:
    """(question, answer, type, image) for `images` drawings of a seeded stream; `draw(rng)` -> (image, colour,
    shape), by default `render_single` in `Style.train()`."""
    draw = draw or (lambda rng: render_single(Style.train(), rng))
    rng = random.Random(seed)
    rows = []
    for _ in range(images):
        image, color, shape = draw(rng)
        rows += [(q, a, kind, image) for q, a, kind in questions(color, shape, rng, per_image)]
    return rows


def render_single_mpl(rng: random.Random, size: tuple[int, int] = (32, 512)) -> tuple[Image.Image, str, str]:
    """(image, colour name, shape name) drawn by another rasteriser (matplotlib's Agg) with what the training
    renders never show: gradient or noisy backgrounds, outlined shapes, regular triangles at any angle, canvases
    of 1:2.5 to 2.5:1 - an evaluation set drawn differently from any training image."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Rectangle, RegularPolygon

    short = rng.randint(*size)
    aspect = rng.uniform(0.4, 2.5)
    width, height = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, width), axes.set_ylim(0, height), axes.set_axis_off()
    low, high = np.array([rng.randint(200, 250) for _ in range(3)]), np.array([rng.randint(215, 255) for _ in range(3)])
    ramp = np.linspace(0, 1, 64)[:, None, None] if rng.random() < 0.5 else np.random.default_rng(
        rng.randrange(2 ** 32)).uniform(0, 1, (64, 64, 1))
    axes.imshow((low + (high - low) * ramp) / 255, extent=(0, width, 0, height), aspect="auto", zorder=0)
    color_name, shape = rng.choice(COLORS), rng.choice(SHAPES)
    color = tuple(c / 255 for c in sample_color(color_name, rng, pure=False))
    r = rng.uniform(0.12, 0.42) * short
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    edge = tuple(c * 0.4 for c in color) if color_name not in ("black", "gray") and rng.random() < 0.5 else color
    style = dict(facecolor=color, edgecolor=edge, linewidth=max(1.0, r * 0.06), zorder=1)
    patch = (Circle((cx, cy), r, **style) if shape == "circle" else
             RegularPolygon((cx, cy), 3, radius=r, orientation=rng.uniform(0, 6.283), **style) if shape == "triangle"
             else Rectangle((cx - r * 0.8, cy - r * 0.5), r * 1.6, r * rng.uniform(0.6, 1.2),
                            angle=rng.uniform(0, 180), rotation_point="center", **style))
    axes.add_patch(patch)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    return image, color_name, shape
