"""A seeded renderer of simple scenes: named colours, shapes and glyphs on varied canvases, then degraded.

    colour names    red green blue yellow black gray teal brown: each a box in HSV, so a sampled colour keeps its
                    name (pure and PIL-named variants included: "green" spans lime (0,255,0) and PIL's (0,128,0))
    shapes          circle rectangle triangle (easy-vqa's), star arrow heart, and text (digits, letters, words)
    canvas          32-512 px, aspect 1:2 to 2:1; background white, a pale tint, two-tone, a gradient or noise
    degradations    no antialiasing or 4x supersampling, blur, JPEG, pixel noise (the colour names stay true)

`Style` says how far each knob goes: `Style.easy()` draws easy-vqa's own look (64 px squares, pale tints, upright
shapes, pure colours), `Style.shifted()` everything above. Everything comes from a `random.Random`, so a seed gives
the same image every time.
"""

from __future__ import annotations

import colorsys
import io
import math
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter, ImageFont

# name -> (hue range in degrees, saturation range, value range); black and gray ignore the hue
COLOR_BOXES = {
    "red": ((-8, 8), (0.8, 1.0), (0.8, 1.0)),
    "brown": ((0, 28), (0.6, 0.9), (0.45, 0.68)),
    "yellow": ((50, 62), (0.75, 1.0), (0.85, 1.0)),
    "green": ((100, 140), (0.75, 1.0), (0.45, 1.0)),
    "teal": ((172, 188), (0.75, 1.0), (0.4, 0.65)),
    "blue": ((222, 244), (0.75, 1.0), (0.7, 1.0)),
    "black": (None, (0.0, 1.0), (0.0, 0.16)),
    "gray": (None, (0.0, 0.06), (0.4, 0.62)),
}
PURE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0), "black": (0, 0, 0),
        "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42)}  # easy-vqa's own
COLORS = tuple(COLOR_BOXES)
SHAPES = ("circle", "rectangle", "triangle")
GLYPHS = ("star", "arrow", "heart")
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSerif-Bold.ttf")


@dataclass(frozen=True)
class Style:
    """How much a render may vary (each knob's range; the renderer samples within it)."""
    sizes: tuple[int, int] = (64, 64)  # the canvas's shorter side, px
    aspect: tuple[float, float] = (1.0, 1.0)  # width / height
    backgrounds: tuple[str, ...] = ("tint",)
    rotate: bool = False
    pure_colors: bool = True  # easy-vqa's exact colours, else any colour of the name's box
    supersample: tuple[int, ...] = (1,)  # 1: hard edges, 4: antialiased
    blur: float = 0.0  # the largest Gaussian blur radius, as a fraction of the shorter side
    jpeg: tuple[int, int] | None = None  # JPEG quality range
    noise: float = 0.0  # the largest pixel noise, in 8-bit levels
    outline: float = 0.0  # probability of a dark outline around a filled shape

    @staticmethod
    def easy() -> "Style":
        return Style()

    @staticmethod
    def train() -> "Style":
        """What training renders vary: every knob of this renderer (the demo's shifted evaluation set is drawn by
        another rasteriser, with shapes and aspect ratios this one never draws)."""
        return Style(sizes=(32, 512), aspect=(0.5, 2.0), backgrounds=("white", "tint", "two-tone", "gradient", "noise"),
                     rotate=True, pure_colors=False, supersample=(1, 2, 4), blur=0.02, jpeg=(35, 95), noise=8.0,
                     outline=0.3)

    @staticmethod
    def shifted() -> "Style":
        return Style(sizes=(32, 512), aspect=(0.5, 2.0), backgrounds=("white", "tint", "two-tone", "gradient",
                                                                           "noise"),
                     rotate=True, pure_colors=False, supersample=(1, 4), blur=0.02, jpeg=(35, 95), noise=8.0,
                     outline=0.15)


def sample_color(name: str, rng: random.Random, pure: bool) -> tuple[int, int, int]:
    """An RGB colour that a person would give `name` (easy-vqa's exact one when `pure`)."""
    if pure:
        return PURE[name]
    hues, sats, vals = COLOR_BOXES[name]
    hue = rng.uniform(*hues) % 360 if hues else rng.uniform(0, 360)
    rgb = colorsys.hsv_to_rgb(hue / 360, rng.uniform(*sats), rng.uniform(*vals))
    return tuple(round(255 * c) for c in rgb)


def canvas(style: Style, rng: random.Random) -> Image.Image:
    """An empty canvas of a sampled size and aspect ratio, with a pale background."""
    short = rng.randint(*style.sizes)
    aspect = math.exp(rng.uniform(math.log(style.aspect[0]), math.log(style.aspect[1])))
    width, height = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    kind = rng.choice(style.backgrounds)
    pale = lambda: tuple(rng.randint(215, 255) for _ in range(3))  # noqa: E731
    if kind == "white":
        return Image.new("RGB", (width, height), (255, 255, 255))
    image = Image.new("RGB", (width, height), pale())
    if kind == "two-tone":
        draw = ImageDraw.Draw(image)
        split = rng.uniform(0.2, 0.8)
        box = [0, 0, round(width * split), height] if rng.random() < 0.5 else [0, 0, width, round(height * split)]
        draw.rectangle(box, fill=pale())
    elif kind == "gradient":
        other = Image.new("RGB", (width, height), pale())
        mask = Image.linear_gradient("L").resize((width, height)).rotate(rng.choice([0, 90, 180, 270]))
        image = Image.composite(image, other, mask)
    elif kind == "noise":
        image = Image.blend(image, grey_noise((width, height), 40, rng), 0.15)
    return image


def grey_noise(size: tuple[int, int], sigma: float, rng: random.Random) -> Image.Image:
    """Grey Gaussian noise around 128, seeded from `rng` (PIL's own noise is not)."""
    return seeded_noise(size, sigma, rng.randrange(2 ** 32))


def seeded_noise(size: tuple[int, int], sigma: float, seed: int) -> Image.Image:
    import numpy as np

    noise = np.random.default_rng(seed).normal(128, sigma, (size[1], size[0]))
    return Image.fromarray(noise.clip(0, 255).astype(np.uint8), "L").convert("RGB")


def polygon(kind: str, cx: float, cy: float, r: float, angle: float, rng: random.Random) -> list[tuple]:
    """The outline points of a shape of radius r around (cx, cy), turned by `angle` degrees."""
    if kind == "rectangle":
        aspect = rng.uniform(0.45, 1.0)
        w, h = (r, r * aspect) if rng.random() < 0.5 else (r * aspect, r)
        points = [(-w, -h), (w, -h), (w, h), (-w, h)]
    elif kind == "triangle":
        points = [(0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)]
    elif kind == "star":
        points = [(math.sin(k * math.pi / 5) * (r if k % 2 == 0 else r * 0.45),
                   -math.cos(k * math.pi / 5) * (r if k % 2 == 0 else r * 0.45)) for k in range(10)]
    elif kind == "arrow":
        points = [(-r, -0.3 * r), (0.2 * r, -0.3 * r), (0.2 * r, -0.75 * r), (r, 0), (0.2 * r, 0.75 * r),
                  (0.2 * r, 0.3 * r), (-r, 0.3 * r)]
    elif kind == "heart":
        points = [(16 * math.sin(t) ** 3 * r / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                                    - math.cos(4 * t)) * r / 17)
                  for t in (k * 2 * math.pi / 48 for k in range(48))]
    else:
        raise ValueError(f"unknown shape {kind!r}")
    a = math.radians(angle)
    return [(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)) for x, y in points]


def enlarge(image: Image.Image, scale: int) -> Image.Image:
    """The canvas `scale` times larger, to draw on for antialiased edges (each pixel repeated: nothing to filter)."""
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) if scale > 1 else image


def shrink(image: Image.Image, scale: int) -> Image.Image:
    """A drawing on an `enlarge`d canvas back at its size: each scale x scale block averaged (antialiasing)."""
    return image.reduce(scale) if scale > 1 else image


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float], color: tuple, angle: float,
               outline: tuple | None, rng: random.Random, scale: int = 1) -> None:
    """A filled shape centred at box = (cx, cy, radius), in canvas pixels times `scale`."""
    cx, cy, r = (v * scale for v in box)
    width = max(1, round(r * 0.08)) if outline else 0
    if kind == "circle":
        squash = rng.uniform(0.92, 1.0)
        draw.ellipse([cx - r, cy - r * squash, cx + r, cy + r * squash], fill=color, outline=outline, width=width)
    else:
        draw.polygon(polygon(kind, cx, cy, r, angle, rng), fill=color, outline=outline, width=width)


def draw_text(image: Image.Image, text: str, box: tuple[float, float, float], color: tuple, angle: float,
              font_name: str, scale: int = 1) -> None:
    """`text` fitted into the box (cx, cy, half-height), turned by `angle` degrees."""
    cx, cy, r = (v * scale for v in box)
    font = ImageFont.truetype(_font_path(font_name), size=max(6, round(2 * r)))
    left, top, right, bottom = font.getbbox(text)
    patch = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(patch).text((2 - left, 2 - top), text, fill=255, font=font)
    patch = patch.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
    fill = Image.new("RGB", patch.size, color)
    image.paste(fill, (round(cx - patch.width / 2), round(cy - patch.height / 2)), patch)


def _font_path(name: str) -> str:
    """A TrueType font that matplotlib ships (DejaVu)."""
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", name)


@dataclass(frozen=True)
class Degradation:
    """Sampled degradations, each None where not drawn: blur (its radius over the short side), pixel noise (sigma,
    seed), JPEG quality."""
    blur: float | None
    noise: tuple[float, int] | None
    jpeg: int | None

    @classmethod
    def sample(cls, style: Style, rng: random.Random) -> "Degradation":
        blur = rng.uniform(0, style.blur) if style.blur and rng.random() < 0.5 else None
        noise = (rng.uniform(0, style.noise), rng.randrange(2 ** 32)) if style.noise and rng.random() < 0.5 else None
        jpeg = rng.randint(*style.jpeg) if style.jpeg and rng.random() < 0.5 else None
        return cls(blur, noise, jpeg)

    def apply(self, image: Image.Image) -> Image.Image:
        """The image blurred, noised and JPEG-compressed as sampled (no random draws: painted anywhere)."""
        if self.blur is not None:
            image = image.filter(ImageFilter.GaussianBlur(self.blur * min(image.size)))
        if self.noise is not None:
            image = Image.blend(image, seeded_noise(image.size, 64, self.noise[1]), self.noise[0] / 128)
        if self.jpeg is not None:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=self.jpeg)
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return image


def degrade(image: Image.Image, style: Style, rng: random.Random) -> Image.Image:
    """Blur, pixel noise and JPEG, each as far as the style allows (sampled)."""
    return Degradation.sample(style, rng).apply(image)


def on_every_core(function, items: list, workers: int | None = None) -> list:
    """[function(item) for item in items], in order, on `workers` processes (default: one a core); chunks of items
    amortise the hand-over. For drawing: `function` must make no draws of a shared stream."""
    from concurrent.futures import ProcessPoolExecutor

    workers = min(workers or os.cpu_count() or 1, len(items))
    if workers <= 1:
        return [function(item) for item in items]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(function, items, chunksize=max(1, min(64, len(items) // (workers * 4)))))


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: renders are written by the thousand
    return buffer.getvalue()
