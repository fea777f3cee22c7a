"""Positive-control reward: 1 when the boxed answer is an even integer, else 0.

A reward this easy must rise within a few GRPO steps; if it does not, the loop is broken.
"""

from __future__ import annotations

import re
from typing import Any

_BOXED_INT = re.compile(r"\\boxed\{(-?\d+)\}")


def compute_score(reward_input: dict[str, Any]) -> dict[str, float]:
    match = _BOXED_INT.search(reward_input["response"])
    even = float(match is not None and int(match.group(1)) % 2 == 0)
    return {"overall": even, "accuracy": even}
