"""Toy visual reasoning task: chained arithmetic whose starting number is shown only in an image.

Each row keeps the geometry3k format (``images``, ``problem``, ``answer``) plus the step-by-step
``solution`` of :mod:`megatron_guided.data.toy_arith`::

    images:   ["images/train_00012.png"]     (the number 47 drawn as two seven-segment digits)
    problem:  "<image>Let N be the number in the image. Compute ((N+5)-3)+8."
    solution: "Step 1: 47+5=52\\nStep 2: 52-3=49\\nStep 3: 49+8=57\\n<answer>\\\\boxed{57}</answer>"
    answer:   "57"

So the policy must read N from the picture before it can do any step. The digits are drawn with
Pillow rectangles (no font files), white on black, one digit per 16×32 half of a 32×32 image: with
the tiny model's 8-pixel patches and 2×2 merge each digit is one column of two image tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from megatron_guided.data.toy_arith import make_splits

__all__ = ["IMAGE_SIZE", "make_visual_splits", "render_number", "visual_problem"]

IMAGE_SIZE = 32
# Seven segments as (x0, y0, x1, y1) in a 16×32 digit cell: a top, b top-right, c bottom-right,
# d bottom, e bottom-left, f top-left, g middle.
_SEGMENTS = {"a": (3, 2, 12, 4), "b": (11, 3, 13, 15), "c": (11, 17, 13, 29), "d": (3, 27, 12, 29),
             "e": (2, 17, 4, 29), "f": (2, 3, 4, 15), "g": (3, 15, 12, 17)}
_DIGITS = {"0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg", "5": "acdfg", "6": "acdefg",
           "7": "abc", "8": "abcdefg", "9": "abcdfg"}


def render_number(n: int) -> Image.Image:
    """``n`` in 10..99 as two seven-segment digits on a black 32×32 RGB image."""
    if not 10 <= n <= 99:
        raise ValueError(f"render_number draws two-digit numbers, got {n}")
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    draw = ImageDraw.Draw(image)
    for cell, digit in enumerate(str(n)):
        for segment in _DIGITS[digit]:
            x0, y0, x1, y1 = _SEGMENTS[segment]
            draw.rectangle((x0 + 16 * cell, y0, x1 + 16 * cell, y1), fill=(255, 255, 255))
    return image


def visual_problem(example: dict[str, Any]) -> str:
    """toy_arith's ``Compute ((47+5)-3)+8.`` with the start number replaced by N (shown in the image)."""
    start = str(example["steps"][0]["lhs"])
    prefix = "Compute " + "(" * (len(example["steps"]) - 1)
    text = example["problem"]
    if not text.startswith(prefix + start):
        raise ValueError(f"unexpected toy_arith problem {text!r}")
    return "<image>Let N be the number in the image. " + prefix + "N" + text[len(prefix + start):]


def make_visual_splits(out: str | Path, splits: dict[str, int], *, seed: int = 0) -> dict[str, list[dict]]:
    """Rows for each split name → count (distinct problems across splits, easy difficulty); images
    are written to ``<out>/images/<split>_<i>.png`` and referenced by paths relative to ``out``."""
    names = list(splits)
    train_n = sum(splits[name] for name in names[1:])
    rest, first = make_splits(train_n, splits[names[0]], difficulty="easy", seed=seed)
    (Path(out) / "images").mkdir(parents=True, exist_ok=True)
    chunks, start = {names[0]: first}, 0
    for name in names[1:]:
        chunks[name], start = rest[start: start + splits[name]], start + splits[name]
    rows: dict[str, list[dict]] = {}
    for name, examples in chunks.items():
        rows[name] = []
        for i, ex in enumerate(examples):
            rel = f"images/{name}_{i:05d}.png"
            render_number(ex["steps"][0]["lhs"]).save(Path(out) / rel)
            rows[name].append({"images": [rel], "problem": visual_problem(ex), "answer": ex["answer"],
                               "solution": ex["solution"], "steps": ex["steps"]})
    return rows
