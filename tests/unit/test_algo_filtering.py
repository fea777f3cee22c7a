"""DAPO dynamic sampling and overlong reward shaping vs naive references."""

import random

import pytest
import torch

from megatron_guided.algo.filtering import dynamic_sampling_keep_mask, overlong_reward_shaping


def test_dynamic_sampling_keep_mask_matches_naive():
    rng = random.Random(0)
    ids, rewards = [], []
    # mixed, all-correct, all-wrong, singleton, mixed (float rewards), all-equal float
    spec = [(5, [1.0, 0.0, 1.0, 1.0]), (9, [1.0] * 4), (2, [0.0] * 3), (77, [1.0]), (3, [0.25, 0.5]), (40, [0.3] * 3)]
    for gid, rs in spec:
        ids += [gid] * len(rs)
        rewards += rs
    order = list(range(len(ids)))
    rng.shuffle(order)
    ids = [ids[i] for i in order]
    rewards = [rewards[i] for i in order]
    got = dynamic_sampling_keep_mask(torch.tensor(rewards, dtype=torch.float64), torch.tensor(ids))
    want = []
    for i in range(len(ids)):
        g = [rewards[j] for j in range(len(ids)) if ids[j] == ids[i]]
        want.append(max(g) != min(g))
    assert got.dtype == torch.bool
    assert got.tolist() == want
    assert sorted({g for g, k in zip(ids, want) if k}) == [3, 5]


def test_dynamic_sampling_all_kept_and_all_dropped():
    gid = torch.tensor([0, 1, 0, 1])
    assert dynamic_sampling_keep_mask(torch.tensor([1.0, 0.0, 0.0, 1.0]), gid).all()
    assert not dynamic_sampling_keep_mask(torch.tensor([1.0, 0.0, 1.0, 0.0]), gid).any()


def _naive_overlong(L, lmax, buf, c):
    if L <= lmax - buf:
        return 0.0
    if L <= lmax:
        return ((lmax - buf) - L) / buf * c
    return -c


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_overlong_reward_shaping_matches_naive(factor):
    lengths = list(range(0, 31))
    got = overlong_reward_shaping(
        torch.tensor(lengths), max_response_length=20, overlong_buffer_len=4, penalty_factor=factor
    )
    want = [_naive_overlong(L, 20, 4, factor) for L in lengths]
    assert got.dtype == torch.get_default_dtype()
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), atol=1e-6, rtol=0)
    # explicit points: inside the safe zone, inside the buffer, at and beyond Lmax
    assert got[16].item() == 0.0
    assert got[17].item() == pytest.approx(-0.25 * factor)
    assert got[20].item() == pytest.approx(-factor)
    assert got[25].item() == pytest.approx(-factor)


def test_overlong_reward_shaping_float_lengths_and_errors():
    lengths = torch.tensor([18.0], dtype=torch.float64)
    got = overlong_reward_shaping(lengths, max_response_length=20, overlong_buffer_len=4)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        overlong_reward_shaping(torch.tensor([1]), max_response_length=20, overlong_buffer_len=0)
    with pytest.raises(ValueError):
        overlong_reward_shaping(torch.tensor([1]), max_response_length=20, overlong_buffer_len=21)
