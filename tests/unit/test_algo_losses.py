"""Policy losses (PPO-clip, GSPO, CISPO) vs naive per-token Python references (float64, atol=1e-10)."""

import math

import pytest
import torch

from megatron_guided.algo.aggregation import seq_mean_token_mean
from megatron_guided.algo.policy_loss import POLICY_LOSSES, cispo_loss, gspo_loss, ppo_clip_loss

ATOL = 1e-10
B, T = 12, 40


def _inputs(seed=0, log_ratio_std=0.7):
    g = torch.Generator().manual_seed(seed)
    old = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
    new = old + log_ratio_std * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)[:, None].expand(B, T).clone()
    adv += 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # token-level advantages
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[3, 5:9] = False  # interleaved (multi-turn) hole
    mask[7] = False  # empty row
    return new, old, adv, mask


def _clamp(x, lo, hi):
    return max(lo, min(hi, x))


def _naive_ppo(new, old, adv, mask, lo, hi, dual):
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    clipped = [[False] * T for _ in range(B)]
    dual_hit = [[False] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            a = adv[i][t]
            r = math.exp(_clamp(new[i][t] - old[i][t], -20.0, 20.0))
            l1, l2 = -a * r, -a * _clamp(r, 1 - lo, 1 + hi)
            l, g = (l1, -a * r) if l1 >= l2 else (l2, 0.0)
            clipped[i][t] = l2 > l1
            if dual is not None and a < 0 and l > -a * dual:
                l, g = -a * dual, 0.0
                dual_hit[i][t] = True
            loss[i][t], grad[i][t] = l, g
    return loss, grad, clipped, dual_hit


def _lists(*ts):
    return [t.tolist() for t in ts]


@pytest.mark.parametrize("dual", [3.0, None])
def test_ppo_clip_loss_matches_naive_and_grad_zero_where_clipped(dual):
    new, old, adv, mask = _inputs()
    lp = new.clone().requires_grad_(True)
    loss, metrics = ppo_clip_loss(lp, old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_dual=dual)
    loss.sum().backward()
    want_loss, want_grad, clipped, dual_hit = _naive_ppo(*_lists(new, old, adv, mask), 0.2, 0.28, dual)
    assert loss.shape == (B, T)
    torch.testing.assert_close(loss.detach(), torch.tensor(want_loss, dtype=torch.float64), atol=ATOL, rtol=0)
    # autograd gradient == analytic gradient: -A*r when unclipped, exactly 0 when (dual-)clipped / masked
    torch.testing.assert_close(lp.grad, torch.tensor(want_grad, dtype=torch.float64), atol=ATOL, rtol=0)
    clipped_t, dual_t = torch.tensor(clipped), torch.tensor(dual_hit)
    zero_grad = clipped_t | dual_t | ~mask
    assert clipped_t.sum() > 5 and (lp.grad[clipped_t] == 0).all()
    assert (lp.grad[~zero_grad] != 0).all() and (~zero_grad).sum() > 100
    assert torch.equal(metrics["clipfrac"], clipped_t.double())
    assert torch.equal(metrics["dual_clipfrac"], dual_t.double())
    if dual is None:
        assert not dual_t.any()
    else:
        assert dual_t.sum() >= 3, "dual-clip branch must be exercised"
        assert (lp.grad[dual_t] == 0).all()
        assert torch.equal(loss.detach()[dual_t], -adv[dual_t] * dual)
    ratio = torch.exp(new - old)
    torch.testing.assert_close(metrics["ratio"], torch.where(mask, ratio, 0.0), atol=ATOL, rtol=0)
    torch.testing.assert_close(metrics["approx_kl"], torch.where(mask, old - new, 0.0), atol=ATOL, rtol=0)
    assert torch.equal(metrics["clipfrac_high"], (mask & (adv > 0) & (ratio > 1.28)).double())
    assert torch.equal(metrics["clipfrac_low"], (mask & (adv < 0) & (ratio < 0.8)).double())
    assert (loss.detach()[~mask] == 0).all()


def test_ppo_clip_higher_asymmetry():
    # ratios around the asymmetric bounds [0.8, 1.28]
    ratios = torch.tensor([[1.25, 1.30, 0.85, 0.78, 1.25, 0.78]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    old = torch.full_like(ratios, -1.0)
    lp = (old + ratios.log()).requires_grad_(True)
    mask = torch.ones_like(ratios, dtype=torch.bool)
    loss, m = ppo_clip_loss(lp, old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_dual=None)
    loss.sum().backward()
    # 1.25 > 1.2 but < 1.28: NOT clipped for A>0 (clip-higher); 1.30 clipped to 1.28
    # 0.85 not clipped for A<0; 0.78 < 0.8 clipped to 0.8
    # A<0 with r=1.25 and A>0 with r=0.78: the unclipped term is the max -> not clipped
    want = torch.tensor([[-1.25, -1.28, 0.85, 0.80, 1.25, -0.78]], dtype=torch.float64)
    torch.testing.assert_close(loss.detach(), want, atol=1e-12, rtol=0)
    assert m["clipfrac"].tolist() == [[0.0, 1.0, 0.0, 1.0, 0.0, 0.0]]
    assert m["clipfrac_high"].tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
    assert m["clipfrac_low"].tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]]
    assert (lp.grad[0, [1, 3]] == 0).all() and (lp.grad[0, [0, 2, 4, 5]] != 0).all()
    # symmetric clipping (0.2/0.2) clips the 1.25 token
    loss_sym, _ = ppo_clip_loss(
        lp.detach(), old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_dual=None
    )
    assert loss_sym[0, 0].item() == pytest.approx(-1.2, abs=1e-12)


def test_ppo_log_ratio_clamped_before_exp():
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = torch.tensor([[50.0, -50.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = ppo_clip_loss(lp, old, adv, mask, clip_ratio_dual=None)
    assert m["ratio"][0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-12)
    assert loss[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-12)
    assert m["ratio"][0, 1].item() == pytest.approx(math.exp(-20.0), rel=1e-12)
    assert torch.isfinite(loss).all()


def test_ppo_rejects_bad_dual_clip():
    new, old, adv, mask = _inputs()
    with pytest.raises(ValueError):
        ppo_clip_loss(new, old, adv, mask, clip_ratio_dual=0.9)


def _naive_gspo(new, old, adv, mask, lo, hi):
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    ratio = [[0.0] * T for _ in range(B)]
    for i in range(B):
        idx = [t for t in range(T) if mask[i][t]]
        mean_lr = sum(new[i][t] - old[i][t] for t in idx) / len(idx) if idx else 0.0
        s = math.exp(_clamp(mean_lr, -20.0, 20.0))
        for t in idx:
            a = adv[i][t]
            l1, l2 = -a * s, -a * _clamp(s, 1 - lo, 1 + hi)
            loss[i][t] = max(l1, l2)
            grad[i][t] = -a * s if l1 >= l2 else 0.0  # d s_{i,t} / d logpi_{i,t} = s_i
            ratio[i][t] = s
    return loss, grad, ratio


def test_gspo_loss_matches_naive():
    new, old, adv, mask = _inputs(seed=1, log_ratio_std=0.002)
    lp = new.clone().requires_grad_(True)
    loss, m = gspo_loss(lp, old, adv, mask, clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    loss.sum().backward()
    want_loss, want_grad, want_ratio = _naive_gspo(*_lists(new, old, adv, mask), 3e-4, 4e-4)
    torch.testing.assert_close(loss.detach(), torch.tensor(want_loss, dtype=torch.float64), atol=ATOL, rtol=0)
    torch.testing.assert_close(lp.grad, torch.tensor(want_grad, dtype=torch.float64), atol=ATOL, rtol=0)
    torch.testing.assert_close(m["ratio"], torch.tensor(want_ratio, dtype=torch.float64), atol=ATOL, rtol=0)
    # both clipped and unclipped tokens occur, and clipped ones have zero gradient
    assert 0 < m["clipfrac"].sum() < mask.sum()
    assert (lp.grad[m["clipfrac"] == 1] == 0).all()
    assert (m["clipfrac"] == (m["clipfrac_high"] + m["clipfrac_low"])).all()


def test_gspo_token_gradient_equals_sequence_level_gspo():
    """With a per-sequence advantage and seq-mean-token-mean, GSPO-token == GSPO (sequence objective)."""
    new, old, _, mask = _inputs(seed=2, log_ratio_std=0.002)
    g = torch.Generator().manual_seed(5)
    adv_seq = torch.randn(B, generator=g, dtype=torch.float64)
    adv = adv_seq[:, None].expand(B, T)
    lp1 = new.clone().requires_grad_(True)
    loss, _ = gspo_loss(lp1, old, adv, mask)
    seq_mean_token_mean(loss, mask, global_num_seqs=B).backward()

    lp2 = new.clone().requires_grad_(True)
    total = 0.0
    for i in range(B):
        n = int(mask[i].sum())
        if n == 0:
            continue
        s = torch.exp((lp2[i] - old[i])[mask[i]].sum() / n)  # no stop-gradient anywhere
        a = adv_seq[i]
        total = total + torch.maximum(-a * s, -a * torch.clamp(s, 1 - 3e-4, 1 + 4e-4))
    (total / B).backward()
    torch.testing.assert_close(lp1.grad, lp2.grad, atol=ATOL, rtol=0)
    assert lp1.grad.abs().sum() > 0


def test_cispo_loss_matches_naive_and_keeps_gradient_when_clipped():
    new, old, adv, mask = _inputs(seed=3)
    lp = new.clone().requires_grad_(True)
    loss, m = cispo_loss(lp, old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28)
    loss.sum().backward()
    nl, ol, al, ml = _lists(new, old, adv, mask)
    want_loss = [[0.0] * T for _ in range(B)]
    want_grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if ml[i][t]:
                w = _clamp(math.exp(_clamp(nl[i][t] - ol[i][t], -20, 20)), 0.8, 1.28)
                want_loss[i][t] = -w * al[i][t] * nl[i][t]
                want_grad[i][t] = -w * al[i][t]
    torch.testing.assert_close(loss.detach(), torch.tensor(want_loss, dtype=torch.float64), atol=ATOL, rtol=0)
    torch.testing.assert_close(lp.grad, torch.tensor(want_grad, dtype=torch.float64), atol=ATOL, rtol=0)
    clipped = m["clipfrac"] == 1
    assert clipped.sum() > 5 and (lp.grad[clipped] != 0).all()  # truncated weight, gradient kept
    ratio = torch.exp(new - old)
    assert torch.equal(m["clipfrac_high"], (mask & (ratio > 1.28)).double())
    assert torch.equal(m["clipfrac_low"], (mask & (ratio < 0.8)).double())


def test_cispo_default_has_no_lower_bound():
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = torch.tensor([[math.log(0.1), math.log(5.0)]], dtype=torch.float64)
    adv = torch.ones(1, 2, dtype=torch.float64)
    loss, m = cispo_loss(lp, old, adv, torch.ones(1, 2))
    # weight 0.1 kept (eps_low = 1 -> lower bound 0), weight 5 truncated to 1.28
    want = torch.tensor([[-0.1 * lp[0, 0].item(), -1.28 * lp[0, 1].item()]], dtype=torch.float64)
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=0)
    assert m["clipfrac"].tolist() == [[0.0, 1.0]]


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_policy_losses_common_contract(name):
    new, old, adv, mask = _inputs(seed=4)
    new[~mask] = 123.0  # garbage at padded positions must not leak
    loss, metrics = POLICY_LOSSES[name](new, old, adv, mask.double())
    assert loss.shape == (B, T) and torch.isfinite(loss).all()
    assert (loss[~mask] == 0).all() and (loss[mask] != 0).any()
    assert {"ratio", "approx_kl", "clipfrac", "clipfrac_high", "clipfrac_low"} <= set(metrics)
    for k, v in metrics.items():
        assert v.shape == (B, T) and v.dtype == torch.float64 and (v[~mask] == 0).all(), k
    assert set(POLICY_LOSSES) == {"ppo", "gspo", "cispo"}
