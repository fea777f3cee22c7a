"""SFT pieces: the target mask covers exactly the target tokens; the WSD schedule's shape."""

from __future__ import annotations

import pytest

from megatron_guided.sft import collate, wsd_factor


def test_collate_masks_only_target_tokens():
    examples = [([1, 2, 3], [7, 8, 2]), ([4, 5], [9, 2])]
    ids, attn, target_mask = collate(examples, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 7, 8, 2], [4, 5, 9, 2, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    for row, (prompt, target) in enumerate(examples):
        assert ids[row, 1:][target_mask[row] == 1].tolist() == target


def test_wsd_schedule():
    total, warmup, decay = 100, 10, 20
    factors = [wsd_factor(s, total=total, warmup=warmup, decay=decay) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(f == 1.0 for f in factors[10:80])
    assert factors[80] == pytest.approx(1.0) and factors[90] == pytest.approx(0.5) and factors[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(factors[80:], factors[81:]))
