"""Advantage estimators for outcome-reward RL (GRPO, Dr.GRPO, RLOO, REINFORCE++).

Conventions: per-sample scalars are ``[B]``; token tensors are padded rows
``[B, T]``; ``loss_mask`` ``[B, T]`` (bool or 0/1 float, 1 = trainable policy
token); ``group_ids`` ``LongTensor [B]`` -- samples generated from the same
prompt share an id. Groups need not be contiguous and may differ in size.

Registries:
  - ``OUTCOME_ADVANTAGE_ESTIMATORS``: ``fn(rewards [B], group_ids [B]) -> [B]``
    (broadcast to tokens with ``broadcast_to_tokens``).
  - ``TOKEN_ADVANTAGE_ESTIMATORS``: ``fn(token_rewards [B,T], loss_mask [B,T]) -> [B,T]``
    (use ``place_outcome_reward`` to build ``token_rewards``).
  - ``ADVANTAGE_ESTIMATORS``: union of both, for name validation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from megatron_guided.algo.aggregation import masked_mean

__all__ = [
    "group_mean_std",
    "grpo_advantages",
    "dr_grpo_advantages",
    "rloo_advantages",
    "place_outcome_reward",
    "broadcast_to_tokens",
    "masked_whiten",
    "reinforce_plus_plus_advantages",
    "OUTCOME_ADVANTAGE_ESTIMATORS",
    "TOKEN_ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_ESTIMATORS",
]


def group_mean_std(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample statistics of each sample's group.

    Formula, for sample i in group g of size n_g:
      mean_i  = (1/n_g) * sum_{j in g} r_j
      std_i   = sqrt( sum_{j in g} (r_j - mean_g)^2 / (n_g - 1) )   (unbiased, as torch.std)
      count_i = n_g
    For n_g == 1 the unbiased std is undefined; ``std_i`` is returned as 0.
    If all rewards of a group are equal, mean_i equals them exactly and std_i = 0.

    Shapes: ``rewards`` ``[B]`` float, ``group_ids`` ``[B]`` int;
    returns ``(mean [B], std [B], count [B])``, all in ``rewards.dtype``.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"expected rewards [B] and group_ids [B], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    _, inv = torch.unique(group_ids, return_inverse=True)
    num_groups = rewards.shape[0]  # upper bound on #groups; avoids a host sync
    zeros = rewards.new_zeros(num_groups)
    counts = zeros.index_add(0, inv, torch.ones_like(rewards))
    sums = zeros.index_add(0, inv, rewards)
    mean_g = sums / counts.clamp(min=1)
    # Exact for all-equal groups (sum/n may be off by an ulp, e.g. 3 * 0.7 / 3),
    # so that all-equal rewards give exactly zero advantage.
    gmax = zeros.scatter_reduce(0, inv, rewards, reduce="amax", include_self=False)
    gmin = zeros.scatter_reduce(0, inv, rewards, reduce="amin", include_self=False)
    mean_g = torch.where(gmax == gmin, gmax, mean_g)
    centered = rewards - mean_g[inv]
    sq = zeros.index_add(0, inv, centered * centered)
    var_g = torch.where(counts > 1, sq / (counts - 1).clamp(min=1), zeros)
    std_g = var_g.sqrt()
    return mean_g[inv], std_g[inv], counts[inv]


def grpo_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO outcome advantage (group-normalised reward).

    Formula, for sample i in group g:
      std_normalize=True  (GRPO):    A_i = (r_i - mean_g) / (std_g + eps)
      std_normalize=False (Dr.GRPO): A_i =  r_i - mean_g
    with std_g the UNBIASED group std (torch.std default, divisor n_g - 1).
    A group of size 1 gets A_i = 0 (its std is undefined and r_i - mean_g = 0).
    A group whose rewards are all equal gets A = 0.

    Shapes: ``rewards`` ``[B]`` float, ``group_ids`` ``[B]`` int -> ``[B]``.
    """
    mean, std, count = group_mean_std(rewards, group_ids)
    centered = rewards - mean
    if not std_normalize:
        return centered
    adv = centered / (std + eps)
    return torch.where(count > 1, adv, torch.zeros_like(adv))


def dr_grpo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr.GRPO outcome advantage: A_i = r_i - mean_g (no std normalisation).

    Same as ``grpo_advantages(rewards, group_ids, std_normalize=False)``.
    Size-1 groups get A_i = 0.

    Shapes: ``rewards`` ``[B]``, ``group_ids`` ``[B]`` -> ``[B]``.
    """
    return grpo_advantages(rewards, group_ids, std_normalize=False)


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO (leave-one-out baseline) outcome advantage.

    Formula, for sample i in group g of size n_g:
      A_i = r_i - (1/(n_g - 1)) * sum_{j in g, j != i} r_j
          = n_g / (n_g - 1) * (r_i - mean_g)
    A group of size 1 has no other sample to form a baseline: A_i = 0.

    Shapes: ``rewards`` ``[B]`` float, ``group_ids`` ``[B]`` int -> ``[B]``.
    """
    mean, _, count = group_mean_std(rewards, group_ids)
    adv = (rewards - mean) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, adv, torch.zeros_like(adv))


def place_outcome_reward(rewards: Tensor, loss_mask: Tensor) -> Tensor:
    """Put each sample's scalar reward on its last trainable token.

    Formula: R[i, t] = r_i if t == max{t' : mask[i, t'] = 1} else 0.
    A row with no mask-1 token gets an all-zero row (the reward is dropped).

    Shapes: ``rewards`` ``[B]``, ``loss_mask`` ``[B, T]`` -> ``[B, T]`` (rewards.dtype).
    """
    B, T = loss_mask.shape
    pos = torch.arange(1, T + 1, device=loss_mask.device)
    last = torch.where(loss_mask != 0, pos, torch.zeros_like(pos)).amax(dim=-1)  # [B], 0 = none
    idx = (last - 1).clamp(min=0).unsqueeze(-1)
    src = torch.where(last > 0, rewards, torch.zeros_like(rewards)).unsqueeze(-1)
    return rewards.new_zeros(B, T).scatter(1, idx, src)


def broadcast_to_tokens(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """Broadcast per-sample advantages to tokens.

    Formula: A[i, t] = adv_i * mask[i, t].

    Shapes: ``advantages`` ``[B]``, ``loss_mask`` ``[B, T]`` -> ``[B, T]`` (advantages.dtype).
    """
    return advantages.unsqueeze(-1) * loss_mask.to(advantages.dtype)


def masked_whiten(values: Tensor, loss_mask: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Whiten over all masked tokens of the batch (verl/EasyR1 ``masked_whiten``).

    Formula, with n = sum(mask), mu = sum(mask*x)/n and
    var = sum(mask*(x - mu)^2)/(n - 1)   (unbiased; var = 0 if n <= 1):
      W = (x - mu) / sqrt(var + eps)
    The output is NOT masked (callers multiply by the mask).

    Shapes: ``values``, ``loss_mask`` ``[B, T]`` -> ``[B, T]``.
    """
    mean = masked_mean(values, loss_mask)
    centered = values - mean
    n = loss_mask.to(values.dtype).sum()
    var = masked_mean(centered * centered, loss_mask)
    bessel = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
    var = torch.where(n > 1, var * bessel, torch.zeros_like(var))
    return centered * torch.rsqrt(var + eps)


def reinforce_plus_plus_advantages(
    token_rewards: Tensor,
    loss_mask: Tensor,
    *,
    gamma: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """REINFORCE++ token advantages: discounted return-to-go, then batch whitening.

    Formula, per row i, over the trainable tokens t_1 < t_2 < ... < t_K
    (mask == 1) only:
      G[i, t_k] = sum_{m >= k} gamma^(m - k) * R[i, t_m]
      A = masked_whiten(G, mask, eps) * mask
    where masked_whiten(x) = (x - mu) / sqrt(var + eps), mu / var being the
    mean / unbiased variance over all mask-1 tokens of the batch.
    Masked-out tokens are transparent: their rewards are ignored and they do not
    consume a discount step (matches verl/EasyR1 for right-padded single-turn
    responses; for interleaved multi-turn masks the return flows across the
    masked-out spans, whereas verl resets it there). Output is 0 where mask == 0.
    Usually ``token_rewards = place_outcome_reward(rewards, loss_mask)`` (minus a
    per-token KL penalty, see ``kl.apply_kl_in_reward``).

    Shapes: ``token_rewards``, ``loss_mask`` ``[B, T]`` -> ``[B, T]``.
    """
    m = loss_mask != 0
    r = torch.where(m, token_rewards, token_rewards.new_zeros(()))
    if gamma == 1.0:
        returns = r.flip(-1).cumsum(-1).flip(-1)
    else:
        T = r.shape[-1]
        cols = []
        running = r.new_zeros(r.shape[0])
        for t in range(T - 1, -1, -1):
            running = torch.where(m[:, t], r[:, t] + gamma * running, running)
            cols.append(running)
        returns = torch.stack(cols[::-1], dim=-1)
    returns = torch.where(m, returns, returns.new_zeros(()))
    adv = masked_whiten(returns, loss_mask, eps=eps)
    return torch.where(m, adv, adv.new_zeros(()))


OUTCOME_ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}

TOKEN_ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "reinforce_plus_plus": reinforce_plus_plus_advantages,
}

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    **OUTCOME_ADVANTAGE_ESTIMATORS,
    **TOKEN_ADVANTAGE_ESTIMATORS,
}
