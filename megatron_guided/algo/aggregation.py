"""Masked reductions and loss aggregation normalised over the *global* batch.

A global batch of ``N`` sequences is usually split into micro-batches (and
across data-parallel ranks). Every aggregation here divides by a *global*
normaliser supplied by the caller, so that

    sum over micro-batches m (and DP ranks) of aggregate_loss(l_m, mask_m, ...)
        == aggregate_loss(l_full, mask_full, ...)

i.e. accumulating gradients of the per-micro-batch results gives exactly the
gradient of the full-batch loss, independent of how the batch was split.

Note on DP: if the data-parallel gradient reduction *averages* over ranks
(divides by ``dp_size``), the caller must multiply the result by ``dp_size``
(or reduce with a sum) to keep this invariance.

Registry: ``LOSS_AGG_MODES`` maps a mode name to its aggregation function.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
    "aggregate_loss",
    "LOSS_AGG_MODES",
]


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x * mask, with exact zeros (not NaN * 0) where mask == 0."""
    zero = x.new_zeros(())
    if mask.dtype == torch.bool:
        return torch.where(mask, x, zero)
    return torch.where(mask != 0, x * mask.to(x.dtype), zero)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Masked sum.

    Formula: S = sum(mask * x) over ``dim`` (all elements if ``dim`` is None).
    Positions with mask == 0 contribute exactly 0 even if ``x`` is NaN/inf there.

    Shapes: ``x`` and ``mask`` broadcastable to each other (typically ``[B, T]``);
    returns a 0-d tensor (``dim=None``) or ``x`` reduced along ``dim``.
    """
    xm = _masked(x, mask)
    if dim is None:
        return xm.sum()
    return xm.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Masked mean.

    Formula: M = sum(mask * x) / sum(mask) over ``dim`` (all elements if None).
    If sum(mask) == 0 the result is 0 (not NaN). ``mask`` is a 0/1 (bool or
    float) tensor; masked-out entries of ``x`` may hold NaN/inf.

    Shapes: ``x``, ``mask``: ``[B, T]`` (any matching shape); returns 0-d
    (``dim=None``) or ``x`` reduced along ``dim`` (e.g. ``[B]`` for ``dim=-1``).
    """
    num = masked_sum(x, mask, dim)
    m = mask.to(num.dtype)
    den = m.sum() if dim is None else m.sum(dim=dim)
    den = torch.where(den != 0, den, torch.ones_like(den))
    return num / den


def token_mean(
    per_token_loss: Tensor,
    loss_mask: Tensor,
    *,
    global_num_tokens: Tensor | float,
) -> Tensor:
    """``token-mean`` aggregation.

    Formula: L = sum_{i,t} mask[i,t] * l[i,t] / global_num_tokens,
    where global_num_tokens = total number of mask-1 tokens in the global batch.

    Shapes: ``per_token_loss``, ``loss_mask``: ``[b, T]`` (micro-batch);
    ``global_num_tokens``: python number or 0-d tensor; returns 0-d tensor.
    """
    return masked_sum(per_token_loss, loss_mask) / global_num_tokens


def seq_mean_token_mean(
    per_token_loss: Tensor,
    loss_mask: Tensor,
    *,
    global_num_seqs: int,
) -> Tensor:
    """``seq-mean-token-mean`` aggregation.

    Formula: L = sum_i [ sum_t mask[i,t] * l[i,t] / sum_t mask[i,t] ] / global_num_seqs.
    A sequence with no mask-1 token contributes 0 (it still counts in
    ``global_num_seqs`` if the caller counted it).

    Shapes: ``per_token_loss``, ``loss_mask``: ``[b, T]``; returns 0-d tensor.
    """
    per_seq = masked_mean(per_token_loss, loss_mask, dim=-1)
    return per_seq.sum() / global_num_seqs


def seq_mean_token_sum(
    per_token_loss: Tensor,
    loss_mask: Tensor,
    *,
    global_num_seqs: int,
) -> Tensor:
    """``seq-mean-token-sum`` aggregation.

    Formula: L = sum_i sum_t mask[i,t] * l[i,t] / global_num_seqs.

    Shapes: ``per_token_loss``, ``loss_mask``: ``[b, T]``; returns 0-d tensor.
    """
    return masked_sum(per_token_loss, loss_mask) / global_num_seqs


def seq_mean_token_sum_norm(
    per_token_loss: Tensor,
    loss_mask: Tensor,
    *,
    global_num_seqs: int,
    max_response_len: int,
) -> Tensor:
    """``seq-mean-token-sum-norm`` aggregation (Dr.GRPO).

    Formula: L = sum_i sum_t mask[i,t] * l[i,t] / (global_num_seqs * max_response_len),
    with a constant ``max_response_len`` (the generation budget, not the
    micro-batch's padded length) so the normaliser does not depend on lengths.

    Shapes: ``per_token_loss``, ``loss_mask``: ``[b, T]``; returns 0-d tensor.
    """
    if max_response_len is None or max_response_len <= 0:
        raise ValueError(
            f"seq-mean-token-sum-norm requires a positive max_response_len, got {max_response_len!r}"
        )
    return masked_sum(per_token_loss, loss_mask) / (global_num_seqs * max_response_len)


LOSS_AGG_MODES: dict[str, Callable[..., Tensor]] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def aggregate_loss(
    per_token_loss: Tensor,
    loss_mask: Tensor,
    *,
    mode: str,
    global_num_tokens: Tensor | float,
    global_num_seqs: int,
    max_response_len: int | None = None,
) -> Tensor:
    """Reduce a micro-batch's per-token loss with a global-batch normaliser.

    Dispatches on ``mode`` (a key of ``LOSS_AGG_MODES``):
      - ``token-mean``:              sum(mask*l) / global_num_tokens
      - ``seq-mean-token-mean``:     sum_i [sum_t mask*l / sum_t mask] / global_num_seqs
      - ``seq-mean-token-sum``:      sum_i sum_t mask*l / global_num_seqs
      - ``seq-mean-token-sum-norm``: sum_i sum_t mask*l / (global_num_seqs * max_response_len)

    Summing the results over all micro-batches (and DP ranks) of a global batch
    equals the result for the whole global batch at once.

    Shapes: ``per_token_loss``, ``loss_mask``: ``[b, T]``; returns 0-d tensor.
    Raises ``ValueError`` for an unknown mode or a missing ``max_response_len``.
    """
    if mode == "token-mean":
        return token_mean(per_token_loss, loss_mask, global_num_tokens=global_num_tokens)
    if mode == "seq-mean-token-mean":
        return seq_mean_token_mean(per_token_loss, loss_mask, global_num_seqs=global_num_seqs)
    if mode == "seq-mean-token-sum":
        return seq_mean_token_sum(per_token_loss, loss_mask, global_num_seqs=global_num_seqs)
    if mode == "seq-mean-token-sum-norm":
        return seq_mean_token_sum_norm(
            per_token_loss,
            loss_mask,
            global_num_seqs=global_num_seqs,
            max_response_len=max_response_len,  # type: ignore[arg-type]
        )
    raise ValueError(f"unknown loss aggregation mode {mode!r}; valid: {sorted(LOSS_AGG_MODES)}")
