"""Images from encoded bytes or files -> RGB, with their content key; size limits checked before decoding."""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image

from ..models.vision_tower import to_rgb
from .skips import CORRUPT_IMAGE, DECOMPRESSION_BOMB, MISSING_IMAGE, SkipRecord, SkipStats

# Images with more pixels are refused before decoding (4096 x 4096, about 16.8 MP: 48 MiB once decoded to RGB).
# PIL's own limit (Image.MAX_IMAGE_PIXELS, left unchanged) still applies above this one.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def load_image(ref: bytes | str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               stats: SkipStats | None = None) -> tuple[Image.Image, str]:
    """Encoded bytes or a path -> (RGB image, sha256 hex of the encoded bytes); raises SkipRecord for a missing,
    corrupt, truncated or oversized image. A non-RGB image is converted and counted in `stats.converted`."""
    if isinstance(ref, bytes):
        data = ref
    else:
        try:
            with open(ref, "rb") as f:
                data = f.read()
        except OSError as err:
            raise SkipRecord(MISSING_IMAGE, f"{ref}: {err.strerror or err}") from None
    image = _decode(data, max_pixels)
    if image.mode != "RGB":
        if stats is not None:
            stats.convert(f"{image.mode}->RGB")
        try:
            image = to_rgb(image)
        except ValueError as err:
            raise SkipRecord(CORRUPT_IMAGE, str(err)) from None
    return image, hashlib.sha256(data).hexdigest()


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    """Check the size in the header, verify the file, then decode it fully (a truncated file fails here)."""
    with warnings.catch_warnings():  # PIL's own bomb warning becomes an error, only inside this block
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise SkipRecord(DECOMPRESSION_BOMB, f"{width}x{height} is over max_image_pixels={max_pixels}")
                probe.verify()
            image = Image.open(io.BytesIO(data))
            image.load()
        except (SkipRecord, MemoryError):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise SkipRecord(DECOMPRESSION_BOMB, str(err)) from None
        except Exception as err:  # PIL signals bad data with many types (OSError, SyntaxError, struct.error, ...)
            raise SkipRecord(CORRUPT_IMAGE, f"{type(err).__name__}: {err}") from None
    return image
