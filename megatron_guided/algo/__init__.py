"""Pure tensor functions for RL post-training algorithms (GRPO family).

Submodules, one job each:
  - ``advantages``:  GRPO / Dr.GRPO / RLOO / REINFORCE++ advantage estimators;
  - ``policy_loss``: PPO-clip (clip-higher, dual clip), GSPO, CISPO per-token losses;
  - ``kl``:          k1 / k2 / k3 KL estimators and KL-in-reward;
  - ``aggregation``: masked reductions and global-batch loss aggregation;
  - ``filtering``:   DAPO dynamic sampling and overlong reward shaping.
"""

from megatron_guided.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    OUTCOME_ADVANTAGE_ESTIMATORS,
    TOKEN_ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    dr_grpo_advantages,
    group_mean_std,
    grpo_advantages,
    masked_whiten,
    place_outcome_reward,
    reinforce_plus_plus_advantages,
    rloo_advantages,
)
from megatron_guided.algo.aggregation import (
    LOSS_AGG_MODES,
    aggregate_loss,
    masked_mean,
    masked_sum,
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
)
from megatron_guided.algo.filtering import dynamic_sampling_keep_mask, overlong_reward_shaping
from megatron_guided.algo.kl import KL_ESTIMATORS, apply_kl_in_reward, kl_k1, kl_k2, kl_k3
from megatron_guided.algo.policy_loss import POLICY_LOSSES, cispo_loss, gspo_loss, ppo_clip_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "OUTCOME_ADVANTAGE_ESTIMATORS",
    "TOKEN_ADVANTAGE_ESTIMATORS",
    "POLICY_LOSSES",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "group_mean_std",
    "grpo_advantages",
    "dr_grpo_advantages",
    "rloo_advantages",
    "place_outcome_reward",
    "broadcast_to_tokens",
    "masked_whiten",
    "reinforce_plus_plus_advantages",
    "ppo_clip_loss",
    "gspo_loss",
    "cispo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "apply_kl_in_reward",
    "masked_sum",
    "masked_mean",
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
    "aggregate_loss",
    "dynamic_sampling_keep_mask",
    "overlong_reward_shaping",
]
