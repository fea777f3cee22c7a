"""EncodedImages: each image object is PNG-encoded once while it lives; entries never keep images alive;
the cached URLs stay within their byte budget."""

from __future__ import annotations

import base64
import gc
import io

import numpy as np
from PIL import Image

from megatron_guided.data.images import EncodedImages, png_data_url


def noise(seed: int, size=(24, 16)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_each_image_object_is_encoded_once_and_decodes_to_the_same_pixels():
    cache = EncodedImages()
    a, b = noise(0), noise(1)
    first = cache.urls([a, b])
    assert cache.urls([a, b]) == first and cache.url(a) is first[0] and cache.encoded == 2
    assert first[0] == png_data_url(a)
    decoded = Image.open(io.BytesIO(base64.b64decode(first[0].split(",", 1)[1])))
    assert np.array_equal(np.asarray(decoded), np.asarray(a))  # lossless: the server sees our pixels
    assert cache.url(noise(0)) == first[0] and cache.encoded == 3  # equal pixels, another object: by identity


def test_an_image_that_is_freed_leaves_the_cache():
    cache = EncodedImages()
    image = noise(2)
    cache.url(image)
    assert len(cache) == 1 and cache.bytes > 0
    del image
    gc.collect()
    assert len(cache) == 0 and cache.bytes == 0


def test_least_recently_used_urls_go_past_the_byte_budget():
    images = [noise(i) for i in range(4)]
    size = len(png_data_url(images[0]))
    cache = EncodedImages(max_bytes=int(2.5 * size))
    cache.urls(images[:2])
    cache.url(images[0])  # images[1] is now the least recently used
    cache.url(images[2])
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    cache.url(images[0])
    assert cache.encoded == 3  # images[0] survived
    cache.url(images[1])
    assert cache.encoded == 4  # images[1] was evicted
