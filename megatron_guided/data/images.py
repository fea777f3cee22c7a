"""Loading the images of a dataset row, and encoding them for HTTP requests.

A row's image column holds a list whose items may be

* a path (``str`` / ``os.PathLike``): absolute, or relative to ``data.image_dir`` and then to
  the folder of the data file the row came from (first hit wins);
* a dict with ``bytes`` (encoded PNG/JPEG/..., as written by ``datasets``' ``Image`` feature and
  by Hugging Face parquet exports) and/or ``path``;
* raw ``bytes``;
* a ``PIL.Image.Image`` (what ``datasets`` yields for an ``Image`` column).

Every image is fully decoded and converted to RGB here, so a truncated or corrupt file fails at
load time (naming the row) instead of in the middle of training.

Images travel in HTTP requests (SGLang ``image_data``, OpenAI ``image_url`` parts) as PNG data URLs.
Every turn of a guided dialogue, every sample of a prompt and every verifier call re-sends the same
images (the same PIL objects, carried from the data loader), so :class:`EncodedImages` encodes each
image object once and reuses the URL while the image lives. Its entries hold only a weak reference to
their image (it never keeps a dataset's images alive) and the URLs are bounded in bytes (least recently
used out), because one high-resolution image is megabytes of base64.
"""

from __future__ import annotations

import base64
import io
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["EncodedImages", "ImageLoadError", "load_image", "load_images", "png_data_url", "resize_to_pixel_budget"]


class ImageLoadError(ValueError):
    """An image entry could not be found, read or decoded; the message says which and why."""


def resize_to_pixel_budget(image: Image.Image, *, min_pixels: int | None = None,
                           max_pixels: int | None = None) -> Image.Image:
    """Scale ``image`` (aspect ratio kept) so that width·height lies in [min_pixels, max_pixels]."""
    w, h = image.size
    area = w * h
    factor = 1.0
    if max_pixels is not None and area > max_pixels:
        factor = math.sqrt(max_pixels / area)
    elif min_pixels is not None and area < min_pixels:
        factor = math.sqrt(min_pixels / area)
    if factor == 1.0:
        return image
    new_size = (max(1, int(w * factor)), max(1, int(h * factor)))
    return image.resize(new_size, Image.Resampling.BICUBIC)


def png_data_url(image: Image.Image) -> str:
    """``data:image/png;base64,...``: the lossless form in which images travel in HTTP requests (OpenAI
    ``image_url`` parts, SGLang ``image_data``), so the server decodes exactly these pixels."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class EncodedImages:
    """``urls(images)``: the PNG data URL of each image, from the cache when that image object was seen.

    Thread-safe (images are dropped, and their entries with them, from whichever thread frees them)."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.encoded = 0
        """How many images were encoded (cache misses), for tests and stats."""
        self._entries: OrderedDict[int, tuple[weakref.ref, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()  # re-entrant: a weakref callback may run inside a locked section

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def urls(self, images: Sequence[Image.Image]) -> list[str]:
        return [self.url(image) for image in images]

    def url(self, image: Image.Image) -> str:
        key = id(image)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is image:
                self._entries.move_to_end(key)
                return entry[1]
        url = png_data_url(image)  # outside the lock: encoding is the slow part
        with self._lock:
            self.encoded += 1
            self._remove(key)
            self._entries[key] = (weakref.ref(image, self._on_free(key)), url)
            self._bytes += len(url)
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                self._remove(next(iter(self._entries)))
        return url

    def _on_free(self, key: int):
        def drop(ref: weakref.ref) -> None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry[0] is ref:
                    self._remove(key)

        return drop

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])


def _describe(item: Any) -> str:
    if isinstance(item, dict):
        return "dict(" + ", ".join(
            f"{k}=<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else f"{k}={v!r}"
            for k, v in item.items()) + ")"
    if isinstance(item, (bytes, bytearray)):
        return f"<{len(item)} bytes>"
    text = repr(item)
    return text if len(text) <= 120 else text[:117] + "..."


def _resolve_path(path: str | os.PathLike, search_dirs: Sequence[str | os.PathLike]) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        if p.is_file():
            return p
        raise ImageLoadError(f"image file not found: {str(p)!r}")
    tried = []
    for folder in search_dirs:
        candidate = Path(folder) / p
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    if not search_dirs and p.is_file():
        return p
    tried = tried or [str(p)]
    raise ImageLoadError(f"image file not found: {str(path)!r} (tried {tried}; set data.image_dir "
                         "to the folder that relative image paths start from)")


def load_image(item: Any, *, search_dirs: Sequence[str | os.PathLike] = (),
               min_pixels: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode one image entry (see the module docstring) into an RGB ``PIL.Image``.

    Raises :class:`ImageLoadError` naming the entry when it is missing, unreadable or of an
    unsupported type.
    """
    try:
        if isinstance(item, Image.Image):
            image = item
            image.load()
        elif isinstance(item, (bytes, bytearray)):
            image = Image.open(io.BytesIO(item))
            image.load()
        elif isinstance(item, dict):
            data = item.get("bytes")
            if data:
                image = Image.open(io.BytesIO(data))
                image.load()
            elif item.get("path"):
                return load_image(item["path"], search_dirs=search_dirs,
                                  min_pixels=min_pixels, max_pixels=max_pixels)
            else:
                raise ImageLoadError(f"image entry {_describe(item)} has neither 'bytes' nor 'path'")
        elif isinstance(item, (str, os.PathLike)):
            path = _resolve_path(item, search_dirs)
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy() if opened.mode == "RGB" else opened.convert("RGB")
        else:
            raise ImageLoadError(
                f"unsupported image entry of type {type(item).__name__}: {_describe(item)} "
                "(expected a path, a dict with 'bytes'/'path', bytes or a PIL image)")
        if image.mode != "RGB":
            image = image.convert("RGB")
    except ImageLoadError:
        raise
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageLoadError(f"cannot read image {_describe(item)}: {type(exc).__name__}: {exc}") from None
    return resize_to_pixel_budget(image, min_pixels=min_pixels, max_pixels=max_pixels)


def load_images(items: Any, *, search_dirs: Sequence[str | os.PathLike] = (),
                min_pixels: int | None = None, max_pixels: int | None = None) -> list[Image.Image]:
    """Decode a row's image column: ``None`` → ``[]``, a single entry → one image, a list → each."""
    if items is None:
        return []
    if isinstance(items, (str, os.PathLike, bytes, bytearray, dict, Image.Image)):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise ImageLoadError(
            f"image column must be a list of images, got {type(items).__name__}: {_describe(items)}")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(load_image(item, search_dirs=search_dirs,
                                  min_pixels=min_pixels, max_pixels=max_pixels))
        except ImageLoadError as exc:
            raise ImageLoadError(f"image {i}: {exc}") from None
    return out
