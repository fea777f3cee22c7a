"""Math reward: format + accuracy of a ``\\boxed{}`` answer inside ``<answer>...</answer>``.

overall = (1 - format_weight) * accuracy + format_weight * format

- format = 1 iff the response holds exactly one ``<answer>``, one ``</answer>`` and exactly one
  ``\\boxed{...}`` between them (whitespace around ``<``, ``>`` and ``/`` ignored).
- accuracy = 1 iff the last ``\\boxed{...}`` of the response equals the ground truth, graded by
  math-verify (integers compared exactly first, which math-verify would agree with, to keep the
  common case fast).
"""

from __future__ import annotations

import re
from typing import Any

from math_verify import parse, verify

_WS_AROUND_TAGS = re.compile(r"\s*([<>/])\s*")
_FORMAT = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INT = re.compile(r"[-+]?\d+")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces matched), or None.

    >>> extract_boxed("so <answer>\\\\boxed{4{2}}</answer>")
    '4{2}'
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def format_score(response: str) -> float:
    text = _WS_AROUND_TAGS.sub(r"\1", response)
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return 0.0
    match = _FORMAT.search(text)
    if match is None:
        return 0.0
    return 1.0 if match.group(1).count("\\boxed{") == 1 and extract_boxed(match.group(1)) is not None else 0.0


def accuracy_score(response: str, ground_truth: str) -> float:
    answer = extract_boxed(response)
    if answer is None:
        return 0.0
    answer, truth = answer.strip(), str(ground_truth).strip()
    if _INT.fullmatch(answer) and _INT.fullmatch(truth):
        return float(int(answer) == int(truth))
    try:
        return float(verify(parse(f"${truth}$"), parse(f"${answer}$")))
    except Exception:  # a malformed model answer scores 0, it never crashes the run
        return 0.0


def compute_score(reward_inputs: list[dict[str, Any]], format_weight: float = 0.1) -> list[dict[str, float]]:
    scores = []
    for item in reward_inputs:
        fmt = format_score(item["response"])
        acc = accuracy_score(item["response"], item["ground_truth"])
        scores.append({"overall": (1 - format_weight) * acc + format_weight * fmt, "format": fmt, "accuracy": acc})
    return scores
