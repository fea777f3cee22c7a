"""Images as SGLang ``image_data``: PNG data URLs, encoded once per image object.

Every turn of a guided dialogue and every sample of a prompt re-sends the same images, and the model
verifier re-sends them too (the same PIL objects, carried from the data loader), so each image is encoded
once and the URL reused while the image lives. Entries hold only a weak reference to their image (the
cache never keeps a dataset's images alive) and the URLs are bounded in bytes (least recently used out),
because one high-resolution image is megabytes of base64.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

from PIL import Image

from megatron_guided.data.images import png_data_url

__all__ = ["EncodedImages"]


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
