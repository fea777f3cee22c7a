"""Loss aggregation vs naive loops, and micro-batch / DP split invariance (float64, atol=1e-12)."""

import pytest
import torch

from megatron_guided.algo.aggregation import LOSS_AGG_MODES, aggregate_loss, masked_mean, masked_sum

ATOL = 1e-12
N, T, MAX_LEN = 10, 16, 20


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(N, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[2, 1:4] = False  # interleaved hole
    mask[6] = False  # empty row
    loss[~mask] = float("nan")  # garbage at padded positions must not leak
    return loss, mask


def _naive(loss, mask, mode, n_tok, n_seq, max_len):
    total = 0.0
    for row_l, row_m in zip(loss.tolist(), mask.tolist()):
        s = sum(l for l, m in zip(row_l, row_m) if m)
        k = sum(row_m)
        if mode == "token-mean":
            total += s / n_tok
        elif mode == "seq-mean-token-mean":
            total += (s / k if k else 0.0) / n_seq
        elif mode == "seq-mean-token-sum":
            total += s / n_seq
        elif mode == "seq-mean-token-sum-norm":
            total += s / (n_seq * max_len)
    return total


@pytest.mark.parametrize("mode", sorted(LOSS_AGG_MODES))
def test_aggregate_matches_naive(mode):
    loss, mask = _batch()
    n_tok = int(mask.sum())
    got = aggregate_loss(loss, mask, mode=mode, global_num_tokens=n_tok, global_num_seqs=N, max_response_len=MAX_LEN)
    assert got.dim() == 0 and torch.isfinite(got)
    assert got.item() == pytest.approx(_naive(loss, mask, mode, n_tok, N, MAX_LEN), abs=ATOL)
    assert LOSS_AGG_MODES[mode](loss, mask, **_kwargs(mode, n_tok)).item() == pytest.approx(got.item(), abs=ATOL)


def _kwargs(mode, n_tok):
    return {
        "token-mean": {"global_num_tokens": n_tok},
        "seq-mean-token-mean": {"global_num_seqs": N},
        "seq-mean-token-sum": {"global_num_seqs": N},
        "seq-mean-token-sum-norm": {"global_num_seqs": N, "max_response_len": MAX_LEN},
    }[mode]


@pytest.mark.parametrize("mode", sorted(LOSS_AGG_MODES))
def test_microbatch_split_invariance(mode):
    """Sum over uneven micro-batches (each cropped to its own padded length, as after
    per-micro-batch padding, spread over 2 'DP ranks') == whole-batch aggregation; same for grads."""
    loss, mask = _batch(seed=1)
    n_tok = mask.sum()  # tensor normaliser (as after an all-reduce)
    full_leaf = torch.where(mask, loss, 0.0).requires_grad_(True)
    full = aggregate_loss(
        full_leaf, mask, mode=mode, global_num_tokens=n_tok, global_num_seqs=N, max_response_len=MAX_LEN
    )
    full.backward()

    # rank 0 gets rows [0, 3) and [3, 7); rank 1 gets [7, 10) -- uneven micro-batches
    leaf = torch.where(mask, loss, 0.0).requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for lo, hi in [(0, 3), (3, 7), (7, 10)]:
        mb_mask = mask[lo:hi]
        t_len = int(mb_mask.any(0).nonzero().max()) + 1  # micro-batch's own padded length
        total = total + aggregate_loss(
            leaf[lo:hi, :t_len],
            mb_mask[:, :t_len],
            mode=mode,
            global_num_tokens=n_tok,
            global_num_seqs=N,
            max_response_len=MAX_LEN,
        )
    total.backward()
    assert total.item() == pytest.approx(full.item(), abs=ATOL)
    assert full.item() != 0.0
    torch.testing.assert_close(leaf.grad, full_leaf.grad, atol=ATOL, rtol=0)


def test_local_normalisation_would_break_invariance():
    """Guard for the test above: normalising by micro-batch-local counts is NOT invariant."""
    loss, mask = _batch(seed=1)
    l0 = torch.where(mask, loss, 0.0)
    full = aggregate_loss(l0, mask, mode="token-mean", global_num_tokens=mask.sum(), global_num_seqs=N)
    local = sum(
        aggregate_loss(
            l0[lo:hi], mask[lo:hi], mode="token-mean", global_num_tokens=mask[lo:hi].sum(), global_num_seqs=hi - lo
        )
        for lo, hi in [(0, 3), (3, 10)]
    )
    assert abs(local.item() - full.item()) > 1e-3


def test_masked_mean_and_sum_match_naive():
    loss, mask = _batch(seed=2)
    rows = []
    for row_l, row_m in zip(loss.tolist(), mask.tolist()):
        vals = [l for l, m in zip(row_l, row_m) if m]
        rows.append(sum(vals) / len(vals) if vals else 0.0)
    flat = [l for row_l, row_m in zip(loss.tolist(), mask.tolist()) for l, m in zip(row_l, row_m) if m]
    want_rows = torch.tensor(rows, dtype=torch.float64)
    torch.testing.assert_close(masked_mean(loss, mask, dim=-1), want_rows, atol=ATOL, rtol=0)
    assert masked_mean(loss, mask).item() == pytest.approx(sum(flat) / len(flat), abs=ATOL)
    assert masked_mean(loss, mask.double()).item() == pytest.approx(sum(flat) / len(flat), abs=ATOL)
    assert masked_sum(loss, mask).item() == pytest.approx(sum(flat), abs=ATOL)
    assert masked_mean(loss, torch.zeros_like(mask)).item() == 0.0  # empty mask -> 0, not NaN


def test_aggregate_loss_errors():
    loss, mask = _batch()
    with pytest.raises(ValueError, match="unknown loss aggregation mode"):
        aggregate_loss(loss, mask, mode="token-sum", global_num_tokens=1.0, global_num_seqs=N)
    with pytest.raises(ValueError, match="max_response_len"):
        aggregate_loss(loss, mask, mode="seq-mean-token-sum-norm", global_num_tokens=1.0, global_num_seqs=N)
    assert set(LOSS_AGG_MODES) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"}
