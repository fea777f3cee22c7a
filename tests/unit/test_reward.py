"""Reward loading/calling and the math reward against hand-written expectations."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_guided.reward.function import RewardFunctionError, RewardManager

MATH = "examples/reward_function/math.py:compute_score"


def test_math_reward_format_and_accuracy():
    manager = RewardManager(MATH, reward_type="batch", kwargs={"format_weight": 0.1})
    cases = [
        ("Step 1: 1+1=2\n<answer>\\boxed{2}</answer>", "2", 1.0, 1.0),
        ("<answer> \\boxed{3} </ answer>", "2", 0.0, 1.0),  # whitespace around tags is tolerated
        ("\\boxed{2}", "2", 1.0, 0.0),  # right answer, no <answer> block
        ("<answer>\\boxed{2}</answer><answer>\\boxed{2}</answer>", "2", 1.0, 0.0),  # two answers
        ("<answer>\\boxed{1/2}</answer>", "0.5", 1.0, 1.0),  # graded by math-verify
        ("<answer>\\boxed{\\frac{1}{2}</answer>", "0.5", 0.0, 0.0),  # unbalanced braces
        ("<answer>\\boxed{-7}</answer>", "-7", 1.0, 1.0),
    ]
    out = manager([{"response": r, "ground_truth": g} for r, g, _, _ in cases])
    for (response, _, acc, fmt), score in zip(cases, out):
        assert (score["accuracy"], score["format"]) == (acc, fmt), response
        assert score["overall"] == pytest.approx(0.9 * acc + 0.1 * fmt)


def test_sequential_reward_and_errors(tmp_path: Path):
    even = RewardManager("examples/reward_function/even_answer.py:compute_score", reward_type="sequential")
    assert [o["overall"] for o in even([{"response": "\\boxed{4}"}, {"response": "\\boxed{3}"}])] == [1.0, 0.0]
    with pytest.raises(RewardFunctionError, match="no such file"):
        RewardManager("nope.py:f", reward_type="batch")
    with pytest.raises(RewardFunctionError, match="has no function 'missing'.*compute_score"):
        RewardManager("examples/reward_function/math.py:missing", reward_type="batch")
    with pytest.raises(RewardFunctionError, match="reward_function_kwargs.*bogus"):
        RewardManager(MATH, reward_type="batch", kwargs={"bogus": 1})
    bad = tmp_path / "bad.py"
    bad.write_text("def f(items):\n    return [{'score': 1.0} for _ in items]\n")
    with pytest.raises(RewardFunctionError, match="'overall'"):
        RewardManager(f"{bad}:f", reward_type="batch")([{"response": "x"}])
