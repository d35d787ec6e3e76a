"""Images from encoded bytes or files -> RGB, with their content key. What one image may cost is bounded:

    header (no pixels decoded yet)   width, height <= max_side; width x height <= max_pixels;
                                     longer side / shorter side <= max_aspect          else SkipRecord
    decode                           a truncated or corrupt file fails here             SkipRecord
    RGB                              RGBA, LA, P, CMYK, 16-bit, grayscale converted (and counted)
    working size                     longer side over work_side -> downscaled to it, aspect kept

The same function serves training data, evaluation, the chat and the API server, so a model sees the same pixels
everywhere. Why the aspect limit: an image processor scales the *shorter* side to its input size, so a 1 x 16384
PNG of 112 bytes would become 224 x 3.7M pixels (GBs). Why the working size: a held image costs at most
work_side^2 x 3 bytes (3 MiB at 1024), whatever was uploaded; the towers read 224-256 px anyway.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

from PIL import Image

from ..models.image_features import bytes_key
from ..models.vision_tower import to_rgb
from .skips import CORRUPT_IMAGE, DECOMPRESSION_BOMB, IMAGE_SHAPE, MISSING_IMAGE, SkipRecord, SkipStats


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 4096 * 4096  # 16.8 MP: 48 MiB once decoded to RGB (PIL's own, higher limit stays too)
    max_side: int = 8192
    max_aspect: float = 20.0  # longer side / shorter side
    work_side: int = 1024  # decoded images are downscaled to this longer side (0: never)

    def __post_init__(self) -> None:
        lows = (("max_pixels", 1), ("max_side", 1), ("max_aspect", 1), ("work_side", 0))
        bad = [f"{name}={getattr(self, name)}" for name, low in lows if getattr(self, name) < low]
        if bad:
            raise ValueError(f"image limits: {', '.join(bad)} (max_pixels, max_side and max_aspect must be at least 1, "
                             f"work_side at least 0)")

    def check(self, width: int, height: int) -> None:
        """SkipRecord unless an image of this size is allowed (before any pixel is decoded)."""
        if width * height > self.max_pixels:
            raise SkipRecord(DECOMPRESSION_BOMB, f"{width}x{height} is over max_pixels={self.max_pixels}")
        if width < 1 or height < 1 or max(width, height) > self.max_side:
            raise SkipRecord(IMAGE_SHAPE, f"{width}x{height}: each side must be 1 to {self.max_side} px")
        if max(width, height) > self.max_aspect * min(width, height):
            raise SkipRecord(IMAGE_SHAPE, f"{width}x{height}: the aspect ratio is over {self.max_aspect:g}:1")


DEFAULT_LIMITS = ImageLimits()


def read_image_bytes(ref: bytes | str) -> bytes:
    """The encoded bytes of an image given as bytes or a path; SkipRecord for a file that cannot be read."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if not isinstance(ref, (str, os.PathLike)):
        raise SkipRecord(MISSING_IMAGE, f"an image must be encoded bytes or a path, not {type(ref).__name__}")
    try:
        with open(ref, "rb") as f:
            return f.read()
    except (OSError, ValueError) as err:
        raise SkipRecord(MISSING_IMAGE, f"{ref}: {getattr(err, 'strerror', None) or err}") from None


def load_image(ref: bytes | str, limits: ImageLimits = DEFAULT_LIMITS,
               stats: SkipStats | None = None) -> tuple[Image.Image, str]:
    """Encoded bytes or a path -> (RGB image within the limits, sha256 hex of the encoded bytes); raises SkipRecord
    for a missing, corrupt, truncated or over-limit image. A non-RGB image is converted and counted in
    `stats.converted`."""
    data = read_image_bytes(ref)
    return decode_image(data, limits, stats), bytes_key(data)


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, stats: SkipStats | None = None) -> Image.Image:
    """`load_image` without the key: encoded bytes -> the RGB image within the limits, at the working size."""
    image = _decode(data, limits)
    if image.mode != "RGB":
        if stats is not None:
            stats.convert(f"{image.mode}->RGB")
        try:
            image = to_rgb(image)
        except ValueError as err:
            raise SkipRecord(CORRUPT_IMAGE, str(err)) from None
    return working_size(image, limits.work_side)


def working_size(image: Image.Image, side: int) -> Image.Image:
    """The image with its longer side cut to `side` (aspect kept, Lanczos); as it is when already that small."""
    if not side or max(image.size) <= side:
        return image
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _decode(data: bytes, limits: ImageLimits) -> Image.Image:
    """Check the size in the header, verify the file, then decode it fully (a truncated file fails here). A large
    JPEG is decoded at a reduced scale (`draft`) that still covers the working size."""
    with warnings.catch_warnings():  # PIL's own bomb warning becomes an error, only inside this block
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as probe:
                limits.check(*probe.size)
                probe.verify()
            image = Image.open(io.BytesIO(data))
            if image.format == "JPEG" and limits.work_side and max(image.size) > limits.work_side:
                scale = limits.work_side / max(image.size)
                image.draft(image.mode, (round(image.width * scale), round(image.height * scale)))
            image.load()
        except (SkipRecord, MemoryError):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise SkipRecord(DECOMPRESSION_BOMB, str(err)) from None
        except Image.UnidentifiedImageError:  # its message names the in-memory file object, not the image
            raise SkipRecord(CORRUPT_IMAGE, f"not an image format PIL reads ({len(data)} bytes starting "
                                            f"{data[:8]!r})") from None
        except Exception as err:  # PIL signals bad data with many types (OSError, SyntaxError, struct.error, ...)
            raise SkipRecord(CORRUPT_IMAGE, f"{type(err).__name__}: {err}") from None
    return image
