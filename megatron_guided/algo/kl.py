"""Per-token KL estimators between the policy and a reference policy.

Estimators (Schulman, "Approximating KL divergence"), with
log_ratio = logpi - logpi_ref, evaluated on samples from pi:
  - k1 (``k1``/``kl``):          logpi - logpi_ref                          (unbiased, high variance)
  - k2 (``k2``/``mse``):         1/2 (logpi - logpi_ref)^2                  (biased, low variance)
  - k3 (``k3``/``low_var_kl``):  exp(logpi_ref - logpi) - (logpi_ref - logpi) - 1   (unbiased, >= 0)

All take ``logprobs``, ``ref_logprobs`` ``[B, T]`` and return ``[B, T]``
(unmasked; reduce with ``aggregation.aggregate_loss`` / ``masked_mean`` or fold
into rewards with ``apply_kl_in_reward``).

Registry: ``KL_ESTIMATORS`` (aliases map to the same function).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["kl_k1", "kl_k2", "kl_k3", "apply_kl_in_reward", "KL_ESTIMATORS"]

K3_LOG_RATIO_CLAMP = 20.0
K3_OUTPUT_CLAMP = 10.0


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 KL estimator: kl = logpi - logpi_ref.

    Shapes: ``logprobs``, ``ref_logprobs`` ``[B, T]`` -> ``[B, T]``.
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 KL estimator: kl = 1/2 * (logpi - logpi_ref)^2.

    Shapes: ``logprobs``, ``ref_logprobs`` ``[B, T]`` -> ``[B, T]``.
    """
    d = logprobs - ref_logprobs
    return 0.5 * d * d


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 ("low_var_kl") KL estimator.

    Formula:
      x  = clamp(logpi_ref - logpi, -20, 20)
      kl = clamp(exp(x) - x - 1, -10, 10)
    (The clamps bound the value and zero the gradient in the extreme regime.)

    Shapes: ``logprobs``, ``ref_logprobs`` ``[B, T]`` -> ``[B, T]``.
    """
    x = torch.clamp(ref_logprobs - logprobs, -K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    kl = torch.exp(x) - x - 1.0
    return torch.clamp(kl, -K3_OUTPUT_CLAMP, K3_OUTPUT_CLAMP)


def apply_kl_in_reward(
    token_rewards: Tensor,
    kl: Tensor,
    loss_mask: Tensor,
    *,
    kl_coef: float,
) -> Tensor:
    """Fold a per-token KL penalty into token rewards.

    Formula: R'[i,t] = R[i,t] - kl_coef * kl[i,t] * mask[i,t]
    (unchanged where mask == 0; NaN/inf KL at masked-out tokens is ignored).

    Shapes: ``token_rewards``, ``kl``, ``loss_mask`` ``[B, T]`` -> ``[B, T]``.
    """
    penalty = torch.where(loss_mask != 0, kl * loss_mask.to(kl.dtype), kl.new_zeros(()))
    return token_rewards - kl_coef * penalty


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "kl": kl_k1,
    "k2": kl_k2,
    "mse": kl_k2,
    "k3": kl_k3,
    "low_var_kl": kl_k3,
}
