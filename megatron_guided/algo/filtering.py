"""DAPO helpers: dynamic sampling (group filtering) and overlong reward shaping.

Conventions: per-sample tensors are ``[B]``; ``group_ids`` ``LongTensor [B]``
(samples of the same prompt share an id; groups need not be contiguous).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dynamic_sampling_keep_mask", "overlong_reward_shaping"]


def dynamic_sampling_keep_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO dynamic sampling: keep samples whose group has non-zero reward variance.

    Formula: keep_i = [ max_{j in g(i)} r_j > min_{j in g(i)} r_j ].
    Groups whose rewards are all equal (all correct / all wrong) give zero GRPO
    advantage and are dropped; a group of size 1 is trivially all-equal and is
    dropped too. Comparison is exact (pass e.g. accuracy or the final reward).

    Shapes: ``rewards`` ``[B]`` float, ``group_ids`` ``[B]`` int -> ``BoolTensor [B]``.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"expected rewards [B] and group_ids [B], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    _, inv = torch.unique(group_ids, return_inverse=True)
    n = rewards.shape[0]  # upper bound on #groups; avoids a host sync
    gmax = rewards.new_zeros(n).scatter_reduce(0, inv, rewards, reduce="amax", include_self=False)
    gmin = rewards.new_zeros(n).scatter_reduce(0, inv, rewards, reduce="amin", include_self=False)
    return gmax[inv] > gmin[inv]


def overlong_reward_shaping(
    response_lengths: Tensor,
    *,
    max_response_length: int,
    overlong_buffer_len: int,
    penalty_factor: float = 1.0,
) -> Tensor:
    """DAPO soft overlong punishment (added to the task reward).

    Formula, with L = response length, Lmax = max_response_length,
    Lbuf = overlong_buffer_len, c = penalty_factor:
      R_len(L) = 0                                   if L <= Lmax - Lbuf
               = -c * (L - (Lmax - Lbuf)) / Lbuf     if Lmax - Lbuf < L <= Lmax
               = -c                                  if L > Lmax
    i.e. R_len = -c * clamp((L - (Lmax - Lbuf)) / Lbuf, 0, 1).

    Shapes: ``response_lengths`` ``[B]`` (int or float) -> ``[B]`` float (the
    input dtype if floating, else the default float dtype).
    """
    if overlong_buffer_len <= 0 or overlong_buffer_len > max_response_length:
        raise ValueError(
            "need 0 < overlong_buffer_len <= max_response_length, got "
            f"{overlong_buffer_len} and {max_response_length}"
        )
    dtype = response_lengths.dtype if response_lengths.is_floating_point() else torch.get_default_dtype()
    lengths = response_lengths.to(dtype)
    expected = max_response_length - overlong_buffer_len
    frac = torch.clamp((lengths - expected) / overlong_buffer_len, 0.0, 1.0)
    return -penalty_factor * frac
