"""Policy-gradient losses: PPO-clip (with clip-higher and dual clip), GSPO, CISPO.

All losses share one shape contract:
  inputs : ``logprobs``, ``old_logprobs``, ``advantages``, ``loss_mask``: ``[B, T]``
           (``advantages`` already token-level, e.g. ``broadcast_to_tokens``);
  outputs: ``(per_token_loss [B, T], metrics)``, both zeroed where mask == 0.
``metrics`` is a ``dict[str, Tensor]`` of per-token ``[B, T]`` float tensors
(0/1 indicators or values); the caller reduces them with the same mask, e.g.
``masked_mean(metrics["clipfrac"], loss_mask)``. Common keys:
  - ``ratio``:         importance ratio actually used by the loss;
  - ``approx_kl``:     old_logprobs - logprobs (k1 estimate of KL(pi_old || pi));
  - ``clipfrac``:      1 where the clipping is active;
  - ``clipfrac_high``: 1 where the upper bound is active;
  - ``clipfrac_low``:  1 where the lower bound is active.
``ppo_clip_loss`` adds ``dual_clipfrac``. The per-token loss is reduced with
``aggregation.aggregate_loss``.

Registry: ``POLICY_LOSSES`` maps a name to its loss function.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "LOG_RATIO_CLAMP",
    "ppo_clip_loss",
    "gspo_loss",
    "cispo_loss",
    "POLICY_LOSSES",
]

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before exp."""


def _zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask != 0, x, x.new_zeros(()))


def _clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """max(-A*r, -A*clip(r, 1-eps_low, 1+eps_high)) plus (high, low) clip indicators."""
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clip_high = (advantages > 0) & (ratio > 1.0 + clip_ratio_high)
    clip_low = (advantages < 0) & (ratio < 1.0 - clip_ratio_low)
    return loss, clip_high, clip_low


def _check_clip(clip_ratio_low: float, clip_ratio_high: float) -> None:
    if not (0.0 <= clip_ratio_low <= 1.0) or clip_ratio_high < 0.0:
        raise ValueError(
            f"need 0 <= clip_ratio_low <= 1 and clip_ratio_high >= 0, got {clip_ratio_low}, {clip_ratio_high}"
        )


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_dual: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level PPO clipped surrogate with asymmetric (clip-higher) bounds and dual clip.

    Formula, per token:
      r   = exp(clamp(logpi - logpi_old, -20, 20))
      L   = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))
      if clip_ratio_dual = c is not None and A < 0:  L = min(L, -A * c)      (dual clip, c > 1)
    Gradient w.r.t. ``logprobs`` is 0 wherever a clip (or dual clip) is active.
    Output is 0 where mask == 0.

    Metrics (``[B, T]`` floats, 0 where mask == 0): ``ratio`` (r), ``approx_kl``
    (logpi_old - logpi), ``clipfrac_high`` (A > 0 and r > 1+eps_high),
    ``clipfrac_low`` (A < 0 and r < 1-eps_low), ``clipfrac`` (either),
    ``dual_clipfrac`` (A < 0 and the dual-clip bound -A*c is active).

    Shapes: ``logprobs``, ``old_logprobs``, ``advantages``, ``loss_mask``: ``[B, T]``
    -> ``(per_token_loss [B, T], metrics)``.
    """
    _check_clip(clip_ratio_low, clip_ratio_high)
    if clip_ratio_dual is not None and clip_ratio_dual <= 1.0:
        raise ValueError(f"clip_ratio_dual must be > 1 (or None), got {clip_ratio_dual}")
    neg_log_ratio = old_logprobs - logprobs
    log_ratio = torch.clamp(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss, clip_high, clip_low = _clipped_surrogate(
        ratio, advantages, clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high
    )
    if clip_ratio_dual is not None:
        dual_bound = -advantages * clip_ratio_dual
        dual = (advantages < 0) & (loss > dual_bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, dual_bound), loss)
    else:
        dual = torch.zeros_like(clip_high)
    dt = loss.dtype
    metrics = {
        "ratio": _zero_outside(ratio.detach(), loss_mask),
        "approx_kl": _zero_outside(neg_log_ratio.detach(), loss_mask),
        "clipfrac": _zero_outside((clip_high | clip_low).to(dt), loss_mask),
        "clipfrac_high": _zero_outside(clip_high.to(dt), loss_mask),
        "clipfrac_low": _zero_outside(clip_low.to(dt), loss_mask),
        "dual_clipfrac": _zero_outside(dual.to(dt), loss_mask),
    }
    return _zero_outside(loss, loss_mask), metrics


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (sequence-level importance ratio), token-level form ("GSPO-token").

    Formula, for sequence i with trainable tokens t (mask == 1), |y_i| = sum_t mask[i,t]:
      log s_i  = (1/|y_i|) * sum_t (logpi[i,t] - logpi_old[i,t])
      s_{i,t}  = exp(clamp(logpi[i,t] - sg(logpi[i,t]) + sg(log s_i), -20, 20))
               (value == s_i; d s_{i,t} / d logpi[i,t] = s_i)
      L[i,t]   = max(-A[i,t] * s_{i,t}, -A[i,t] * clip(s_{i,t}, 1 - eps_low, 1 + eps_high))
    sg = stop-gradient. No dual clip. With a sequence-level advantage and the
    ``seq-mean-token-mean`` aggregation this is exactly the GSPO objective.
    A row with no mask-1 token gets log s_i = 0. Output is 0 where mask == 0.

    Metrics: as ``ppo_clip_loss`` without ``dual_clipfrac``; ``ratio`` is s_i
    broadcast over the row's tokens; ``approx_kl`` is the token-level
    logpi_old - logpi.

    Shapes: ``logprobs``, ``old_logprobs``, ``advantages``, ``loss_mask``: ``[B, T]``
    -> ``(per_token_loss [B, T], metrics)``.
    """
    _check_clip(clip_ratio_low, clip_ratio_high)
    token_log_ratio = logprobs - old_logprobs
    m = loss_mask != 0
    masked_lr = torch.where(m, token_log_ratio, token_log_ratio.new_zeros(()))
    n_tok = m.to(logprobs.dtype).sum(dim=-1)
    seq_log_ratio = masked_lr.sum(dim=-1) / n_tok.clamp(min=1)  # [B]
    log_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1)
    log_ratio = torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss, clip_high, clip_low = _clipped_surrogate(
        ratio, advantages, clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high
    )
    dt = loss.dtype
    metrics = {
        "ratio": _zero_outside(ratio.detach(), loss_mask),
        "approx_kl": _zero_outside(-token_log_ratio.detach(), loss_mask),
        "clipfrac": _zero_outside((clip_high | clip_low).to(dt), loss_mask),
        "clipfrac_high": _zero_outside(clip_high.to(dt), loss_mask),
        "clipfrac_low": _zero_outside(clip_low.to(dt), loss_mask),
    }
    return _zero_outside(loss, loss_mask), metrics


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_ratio_low: float = 1.0,
    clip_ratio_high: float = 0.28,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1): REINFORCE with a clipped, stop-gradient IS weight.

    Formula, per token:
      r = exp(clamp(logpi - logpi_old, -20, 20))
      L = -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logpi
    so dL/dlogpi = -clip(r, ...) * A: every token keeps a gradient (the weight
    is truncated, not the update). Default eps_low = 1.0 => no lower bound
    (lower clip at 0), as in the paper; only eps_high is tuned.
    Output is 0 where mask == 0.

    Metrics: as ``ppo_clip_loss`` without ``dual_clipfrac``; here the clip
    indicators ignore the advantage sign: ``clipfrac_high`` = r > 1+eps_high,
    ``clipfrac_low`` = r < 1-eps_low (weight truncated, gradient NOT zero).

    Shapes: ``logprobs``, ``old_logprobs``, ``advantages``, ``loss_mask``: ``[B, T]``
    -> ``(per_token_loss [B, T], metrics)``.
    """
    _check_clip(clip_ratio_low, clip_ratio_high)
    neg_log_ratio = old_logprobs - logprobs
    log_ratio = torch.clamp(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio).detach()
    weight = torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss = -weight * advantages * logprobs
    clip_high = ratio > 1.0 + clip_ratio_high
    clip_low = ratio < 1.0 - clip_ratio_low
    dt = loss.dtype
    metrics = {
        "ratio": _zero_outside(ratio, loss_mask),
        "approx_kl": _zero_outside(neg_log_ratio.detach(), loss_mask),
        "clipfrac": _zero_outside((clip_high | clip_low).to(dt), loss_mask),
        "clipfrac_high": _zero_outside(clip_high.to(dt), loss_mask),
        "clipfrac_low": _zero_outside(clip_low.to(dt), loss_mask),
    }
    return _zero_outside(loss, loss_mask), metrics


POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "ppo": ppo_clip_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
}
