"""Token log-probabilities and entropy from tensor-parallel logits, never gathering the vocabulary.

Each TP rank holds logits for its slice [start, start + V/tp) of the (padded) vocabulary. With
z = logits / T and padded columns (index >= real vocab size) excluded:

    m      = max_v z_v                                  (all-reduce MAX; a constant for autograd)
    S      = Σ_v exp(z_v - m)                           (all-reduce SUM)
    logp_y = z_y - m - log S                            (z_y summed from the one rank that owns y)
    H      = log S - Σ_v p_v (z_v - m),  p_v = exp(z_v - m) / S

The all-reduces go through megatron's `reduce_from_tensor_model_parallel_region` (forward: sum,
backward: identity), so each rank's gradient is that of the replicated loss w.r.t. its own logits.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _all_reduce_sum(x: Tensor, group) -> Tensor:
    if group is None or torch.distributed.get_world_size(group) == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group)


def vocab_parallel_logprobs(logits: Tensor, targets: Tensor, *, temperature: float, vocab_start: int,
                            vocab_size: int, group=None) -> tuple[Tensor, Tensor]:
    """logits [..., V_local] (this rank's vocabulary slice starting at `vocab_start`), targets [...]
    global token ids < `vocab_size` → (logp [...], entropy [...]) in float32."""
    z = logits.float() / (temperature if temperature > 0 else 1.0)
    local = z.shape[-1]
    column = torch.arange(vocab_start, vocab_start + local, device=z.device)
    padded = column >= vocab_size
    if padded.any():
        z = z.masked_fill(padded, float("-inf"))
    m = z.detach().max(dim=-1, keepdim=True).values
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = z - m
    exp = shifted.exp()
    sum_exp = _all_reduce_sum(exp.sum(-1), group)
    owned = (targets >= vocab_start) & (targets < vocab_start + local)
    local_index = (targets - vocab_start).clamp(0, local - 1)
    target_shifted = torch.where(owned, shifted.gather(-1, local_index[..., None]).squeeze(-1), 0.0)
    target_shifted = _all_reduce_sum(target_shifted, group)
    log_sum = sum_exp.log()
    finite = shifted.masked_fill(padded, 0.0) if padded.any() else shifted  # 0·(-inf) would be NaN
    weighted = _all_reduce_sum((exp * finite).sum(-1), group)
    return target_shifted - log_sum, log_sum - weighted / sum_exp
