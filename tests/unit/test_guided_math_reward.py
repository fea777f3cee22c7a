"""The guided math reward: accuracy/format of the policy's own text plus the verifier's hallucination score."""

from __future__ import annotations

import pytest

from megatron_guided.reward.function import RewardManager

GUIDED = "examples/reward_function/guided_math.py:compute_score"
RIGHT = "Step 1: 47+5=52\nStep 2: 52-3=49\nStep 3: 49+8=57\n<answer>\\boxed{57}</answer>"


def test_formula_on_hand_values():
    manager = RewardManager(GUIDED, reward_type="batch", kwargs={"format_weight": 0.1, "hallucination_weight": 0.2})
    items = [
        {"response": RIGHT, "ground_truth": "57", "verifier_hallucination_score": 1.0},  # 0.7 + 0.1 + 0.2
        {"response": RIGHT, "ground_truth": "57", "verifier_hallucination_score": 0.5},  # 0.7 + 0.1 + 0.1
        {"response": RIGHT.replace("{57}", "{56}"), "ground_truth": "57", "verifier_hallucination_score": 0.0},
        {"response": "\\boxed{57}", "ground_truth": "57", "verifier_hallucination_score": 3.0},  # clamped to 1
        {"response": "\\boxed{57}", "ground_truth": "57", "verifier_hallucination_score": -2},  # clamped to 0
        {"response": RIGHT, "ground_truth": "57"},  # no verifier: (1 - fw) * acc + fw * fmt
        {"response": RIGHT.replace("{57}", "{56}"), "ground_truth": "57", "verifier_hallucination_score": None},
    ]
    out = manager(items)
    assert [o["overall"] for o in out] == pytest.approx([1.0, 0.9, 0.1, 0.9, 0.7, 1.0, 0.1])
    assert [(o["accuracy"], o["format"]) for o in out] == [(1, 1), (1, 1), (0, 1), (1, 0), (1, 0), (1, 1), (0, 1)]
    assert all(set(o) == {"overall", "format", "accuracy"} for o in out)  # same keys, guided or not
    # defaults: format 0.1, hallucination 0.1
    default = RewardManager(GUIDED, reward_type="batch")
    assert default([{"response": RIGHT, "ground_truth": "57", "verifier_hallucination_score": 0.0}])[0]["overall"] \
        == pytest.approx(0.9)
    with pytest.raises(ValueError, match="sum <= 1"):
        manager.fn([], format_weight=0.6, hallucination_weight=0.6)


def test_only_the_policy_text_is_graded():
    manager = RewardManager(GUIDED, reward_type="batch")
    item = {
        "response": "Step 1: 47+5=52\nStep 2: 52-3=49",  # no answer of its own
        "ground_truth": "57",
        "verifier_hallucination_score": 1.0,
        # verifier-looking text in other fields must never count
        "verifier_text": "The answer is <answer>\\boxed{57}</answer>\n###STOP###",
        "context": "<answer>\\boxed{57}</answer>",
    }
    out = manager([item])[0]
    assert out["accuracy"] == 0.0 and out["format"] == 0.0
    assert out["overall"] == pytest.approx(0.1)  # only the hallucination term
