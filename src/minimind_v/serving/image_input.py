"""Request images -> the vision tower's pixel values, off the event loop and with bounded memory.

    data: URL (base64) | local path under --allow-local-images | http(s) URL with --fetch-remote-images
    -> encoded bytes (at most max_image_bytes)
    -> header checked, decoded, downscaled to the working size (data/images.py; refusals are 400s with a code)
    -> pixel values [3, H, W] (Engine.pixel_values): what the queued request holds

Decoding runs in a small dedicated thread pool (`decode_threads`, 2 by default), so at most that many full-size
decoded images exist at once, whatever the number of clients; each is reduced to a small tensor before the next
starts. After a large image the C heap's free pages are handed back to the system (glibc `malloc_trim`), otherwise
the process keeps its peak size after a burst of large images.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import ctypes.util
import os
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from ..data.images import load_image
from ..data.skips import CORRUPT_IMAGE, DECOMPRESSION_BOMB, IMAGE_SHAPE, MISSING_IMAGE, SkipRecord
from ..generation import Engine
from .protocol import APIError, ServerSettings

# why an image was refused (data/skips.py reasons) -> the error code a client sees (all 400s)
SKIP_CODES = {DECOMPRESSION_BOMB: "image_too_large_in_pixels", IMAGE_SHAPE: "image_shape_refused",
              MISSING_IMAGE: "image_not_found", CORRUPT_IMAGE: "invalid_image"}


def load_image_url(url: str, settings: ServerSettings) -> Image.Image:
    """A data: URL (base64), an allowed local path or, when configured, an http(s) URL -> RGB image at the working
    size; APIError otherwise."""
    if url.startswith(("http://", "https://")):
        if not settings.fetch_remote_images:
            raise APIError(400, "remote image URLs are not fetched by this server (start it with "
                                "--fetch-remote-images); send the image as a data:image/...;base64 URL",
                           "remote_url_refused", "messages")
        return _image(fetch(url, settings.max_image_bytes), settings)
    if url.startswith("data:"):
        return _image(_data_url_bytes(url, settings.max_image_bytes), settings)
    path = url.removeprefix("file://")
    root = settings.local_image_root
    if root is None:
        raise APIError(400, "local image paths are refused (start the server with --allow-local-images DIR)",
                       "local_path_refused", "messages")
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([full, os.path.realpath(root)]) != os.path.realpath(root):
        raise APIError(400, f"image path {path!r} is outside the allowed folder", "local_path_refused", "messages")
    if os.path.isfile(full) and os.path.getsize(full) > settings.max_image_bytes:
        raise APIError(413, f"image is over the {settings.max_image_bytes} byte limit", "image_too_large", "messages")
    return _image(full, settings)


def _data_url_bytes(url: str, limit: int) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not payload:
        raise APIError(400, "image data URLs must be data:<type>;base64,<data>", "invalid_image_url", "messages")
    if len(payload) * 3 // 4 > limit:
        raise APIError(413, f"image is over the {limit} byte limit", "image_too_large", "messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image data URL is not valid base64", "invalid_base64", "messages") from None


def fetch(url: str, limit: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            data = response.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise APIError(400, f"could not fetch image {url}: {err}", "image_fetch_failed", "messages") from None
    if len(data) > limit:
        raise APIError(413, f"image is over the {limit} byte limit", "image_too_large", "messages")
    return data


def _image(ref: str | bytes, settings: ServerSettings) -> Image.Image:
    try:
        return load_image(ref, settings.image_limits)[0]
    except SkipRecord as err:
        where = f" {os.path.basename(ref)}" if isinstance(ref, str) else ""
        raise APIError(400, f"image{where}: {err}", SKIP_CODES.get(err.reason, "invalid_image"), "messages") from None


def _malloc_trim():
    """glibc's malloc_trim, or None off glibc (another libc, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class ImageDecoder:
    """Decodes request images into pixel values in `settings.decode_threads` threads of its own. `slots`: how many
    large request bodies may be read and prepared at once (twice the threads: one decoding, one waiting each)."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="image-decode")
        self.slots = asyncio.Semaphore(2 * settings.decode_threads)
        self.trim = _malloc_trim()

    async def pixels(self, url: str) -> torch.Tensor:
        """An image URL of a request -> pixel values [3, H, W] (APIError for a refused image)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._pixels, url)

    async def run(self, function, *args):
        """Run other request preparation (JSON parsing, tokenization) in the same threads."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    def _pixels(self, url: str) -> torch.Tensor:
        image = load_image_url(url, self.settings)
        large = max(image.size) >= self.settings.image_limits.work_side
        pixels = self.engine.pixel_values(image)
        del image
        if large and self.trim is not None:
            self.trim(0)
        return pixels

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
