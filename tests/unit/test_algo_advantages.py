"""Advantage estimators vs naive Python-loop references (float64, atol=1e-10)."""

import math
import random

import pytest
import torch

from megatron_guided.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    OUTCOME_ADVANTAGE_ESTIMATORS,
    TOKEN_ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    dr_grpo_advantages,
    grpo_advantages,
    place_outcome_reward,
    reinforce_plus_plus_advantages,
    rloo_advantages,
)

ATOL = 1e-10


def _grouped_batch(seed=0):
    """Non-contiguous groups of sizes 4, 3, 1, 5, 2, 1 (+ an all-equal group of 3), shuffled."""
    rng = random.Random(seed)
    ids, rewards = [], []
    for gid, size in [(17, 4), (3, 3), (42, 1), (8, 5), (1000, 2), (5, 1)]:
        for _ in range(size):
            ids.append(gid)
            rewards.append(rng.choice([0.0, 1.0]) + rng.gauss(0.0, 0.3))
    for _ in range(3):  # all-equal group
        ids.append(99)
        rewards.append(0.7)
    order = list(range(len(ids)))
    rng.shuffle(order)
    ids = [ids[i] for i in order]
    rewards = [rewards[i] for i in order]
    return ids, rewards


def _members(ids, i):
    return [j for j in range(len(ids)) if ids[j] == ids[i]]


def _naive_grpo(ids, rewards, std_normalize, eps):
    out = []
    for i in range(len(ids)):
        g = [rewards[j] for j in _members(ids, i)]
        n = len(g)
        if n == 1 or max(g) == min(g):  # spec: singleton / all-equal group -> exactly 0
            out.append(0.0)
            continue
        mu = sum(g) / n
        if not std_normalize:
            out.append(rewards[i] - mu)
            continue
        sd = math.sqrt(sum((x - mu) ** 2 for x in g) / (n - 1))
        out.append((rewards[i] - mu) / (sd + eps))
    return out


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def test_grouped_batch_is_non_contiguous():
    ids, _ = _grouped_batch()
    # sanity: at least one group is split by another group's sample
    assert any(ids[i] == ids[i + 2] and ids[i + 1] != ids[i] for i in range(len(ids) - 2))


@pytest.mark.parametrize("std_normalize", [True, False])
def test_grpo_matches_naive(std_normalize):
    ids, rewards = _grouped_batch()
    got = grpo_advantages(_t(rewards), torch.tensor(ids), std_normalize=std_normalize, eps=1e-6)
    want = _naive_grpo(ids, rewards, std_normalize, 1e-6)
    assert got.shape == (len(ids),)
    torch.testing.assert_close(got, _t(want), atol=ATOL, rtol=0)
    # singleton groups (ids 42 and 5) and the all-equal group (99) get exactly 0
    for i, g in enumerate(ids):
        if g in (42, 5, 99):
            assert got[i].item() == 0.0
        elif g != 99:
            assert got[i].item() != 0.0


def test_grpo_uses_unbiased_std_like_torch_std():
    r = torch.tensor([0.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    got = grpo_advantages(r, torch.zeros(4, dtype=torch.long), eps=1e-6)
    torch.testing.assert_close(got, (r - r.mean()) / (r.std() + 1e-6), atol=ATOL, rtol=0)
    # and NOT the biased (population) std
    biased = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    assert not torch.allclose(got, biased)


def test_dr_grpo_is_mean_centering():
    ids, rewards = _grouped_batch(seed=1)
    got = dr_grpo_advantages(_t(rewards), torch.tensor(ids))
    torch.testing.assert_close(got, _t(_naive_grpo(ids, rewards, False, 0.0)), atol=ATOL, rtol=0)


def test_rloo_matches_naive():
    ids, rewards = _grouped_batch(seed=2)
    got = rloo_advantages(_t(rewards), torch.tensor(ids))
    want = []
    for i in range(len(ids)):
        others = [rewards[j] for j in _members(ids, i) if j != i]
        want.append(0.0 if not others else rewards[i] - sum(others) / len(others))
    torch.testing.assert_close(got, _t(want), atol=ATOL, rtol=0)
    for i, g in enumerate(ids):
        if g in (42, 5, 99):
            assert got[i].item() == 0.0


def test_all_equal_rewards_give_zero_advantage():
    r = torch.full((6,), 0.3, dtype=torch.float64)
    gid = torch.tensor([2, 9, 2, 9, 2, 9])
    for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages):
        assert torch.equal(fn(r, gid), torch.zeros(6, dtype=torch.float64)), fn.__name__


def _mask_rows():
    # right-padded, interleaved (multi-turn), empty, full
    return [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [0, 1, 0, 1, 0, 0],
    ]


def test_place_outcome_reward():
    mask = _mask_rows()
    rewards = [0.5, -1.0, 2.0, 3.0, 4.5]
    got = place_outcome_reward(_t(rewards), torch.tensor(mask, dtype=torch.bool))
    want = [[0.0] * 6 for _ in mask]
    for i, row in enumerate(mask):
        last = max((t for t, m in enumerate(row) if m), default=None)
        if last is not None:
            want[i][last] = rewards[i]
    assert torch.equal(got, _t(want))
    # float mask gives the same
    assert torch.equal(place_outcome_reward(_t(rewards), _t(mask)), got)


def test_broadcast_to_tokens():
    mask = _mask_rows()
    adv = [0.5, -1.0, 2.0, 3.0, 4.5]
    got = broadcast_to_tokens(_t(adv), torch.tensor(mask, dtype=torch.bool))
    want = [[adv[i] * m for m in row] for i, row in enumerate(mask)]
    assert torch.equal(got, _t(want))


def _naive_rpp(token_rewards, mask, gamma, eps):
    B, T = len(mask), len(mask[0])
    ret = [[0.0] * T for _ in range(B)]
    for i in range(B):
        pos = [t for t in range(T) if mask[i][t]]
        g = 0.0
        for t in reversed(pos):
            g = token_rewards[i][t] + gamma * g
            ret[i][t] = g
    vals = [ret[i][t] for i in range(B) for t in range(T) if mask[i][t]]
    n = len(vals)
    mu = sum(vals) / n
    var = sum((v - mu) ** 2 for v in vals) / (n - 1)
    return [
        [(ret[i][t] - mu) / math.sqrt(var + eps) if mask[i][t] else 0.0 for t in range(T)]
        for i in range(B)
    ]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_matches_naive(gamma):
    rng = random.Random(3)
    mask = _mask_rows()
    tr = [[rng.gauss(0, 1) for _ in range(6)] for _ in mask]  # dense rewards incl. masked-out ones
    got = reinforce_plus_plus_advantages(_t(tr), _t(mask), gamma=gamma, eps=1e-8)
    want = _naive_rpp(tr, mask, gamma, 1e-8)
    torch.testing.assert_close(got, _t(want), atol=ATOL, rtol=0)
    assert (got[torch.tensor(mask) == 0] == 0).all()
    # whitened over masked tokens: mean 0, unbiased std 1
    vals = got[torch.tensor(mask) == 1]
    assert abs(vals.mean().item()) < 1e-10
    assert abs(vals.std().item() - 1.0) < 1e-6


def _verl_rpp(token_rewards, mask, gamma, eps):
    """verl/EasyR1 reference loop (return resets at masked-out tokens)."""
    r, m = token_rewards, mask.to(token_rewards.dtype)
    returns = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=r.dtype)
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        returns[:, t] = running
        running = running * m[:, t]
    mu = (returns * m).sum() / m.sum()
    var = (((returns - mu) ** 2) * m).sum() / (m.sum() - 1)
    return (returns - mu) * torch.rsqrt(var + eps) * m


@pytest.mark.parametrize("gamma", [1.0, 0.95])
def test_reinforce_plus_plus_equals_verl_for_right_padded_outcome_rewards(gamma):
    g = torch.Generator().manual_seed(4)
    B, T = 7, 9
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randn(B, generator=g, dtype=torch.float64)
    tr = place_outcome_reward(rewards, mask)
    got = reinforce_plus_plus_advantages(tr, mask, gamma=gamma)
    torch.testing.assert_close(got, _verl_rpp(tr, mask, gamma, 1e-8), atol=ATOL, rtol=0)


def test_advantage_registries():
    assert set(OUTCOME_ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo"}
    assert set(TOKEN_ADVANTAGE_ESTIMATORS) == {"reinforce_plus_plus"}
    assert ADVANTAGE_ESTIMATORS == {**OUTCOME_ADVANTAGE_ESTIMATORS, **TOKEN_ADVANTAGE_ESTIMATORS}
    assert ADVANTAGE_ESTIMATORS["grpo"] is grpo_advantages
