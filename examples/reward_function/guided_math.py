"""Guided-GRPO math reward: the math reward plus the verifier's hallucination score.

With ``verifier_hallucination_score`` in the input (a guided sample)::

    overall = (1 - format_weight - hallucination_weight) * accuracy
              + format_weight * format + hallucination_weight * hallucination

where hallucination = the score clamped to [0, 1] (1 = no hallucination). Without it (an open-loop
sample, or a run without the verifier) the hallucination term is dropped and the rest renormalised
exactly as in ``math.py``: ``overall = (1 - format_weight) * accuracy + format_weight * format``.

accuracy and format are ``math.py``'s, graded on the policy's own text only: accuracy on
``item["response"]`` (all its turns; the last ``\\boxed{}`` counts), format on
``item["final_response"]`` (its last turn, so an answer revised after a correction is well formed).
Verifier guidance is never part of it, so a verifier that states the answer cannot earn the policy
accuracy. Outputs always hold the same keys (overall, format, accuracy), whether or not a sample
was guided, so that batch means are well defined.
"""

from __future__ import annotations

import math as _pymath
from pathlib import Path
from typing import Any

from megatron_guided.utils.loading import load_module

_math_reward = load_module(Path(__file__).with_name("math.py"), what="guided_math: examples/reward_function/math.py")
format_score = _math_reward.format_score
accuracy_score = _math_reward.accuracy_score


def compute_score(reward_inputs: list[dict[str, Any]], format_weight: float = 0.1,
                  hallucination_weight: float = 0.1) -> list[dict[str, float]]:
    if format_weight < 0 or hallucination_weight < 0 or format_weight + hallucination_weight > 1:
        raise ValueError(f"need format_weight, hallucination_weight >= 0 with a sum <= 1, got "
                         f"{format_weight}, {hallucination_weight}")
    scores = []
    for item in reward_inputs:
        fmt = format_score(item.get("final_response", item["response"]))
        acc = accuracy_score(item["response"], item["ground_truth"])
        raw = item.get("verifier_hallucination_score")
        if raw is None or (isinstance(raw, float) and _pymath.isnan(raw)):
            overall = (1 - format_weight) * acc + format_weight * fmt
        else:
            hallucination = min(max(float(raw), 0.0), 1.0)
            overall = ((1 - format_weight - hallucination_weight) * acc + format_weight * fmt
                       + hallucination_weight * hallucination)
        scores.append({"overall": overall, "format": fmt, "accuracy": acc})
    return scores
