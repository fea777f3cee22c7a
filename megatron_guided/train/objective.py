"""The policy objective of one micro-batch and the learning-rate schedule: shared by every
TrainBackend, so Torch and Megatron updates are the same function of the same numbers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from megatron_guided.algo.aggregation import aggregate_loss, masked_mean
from megatron_guided.algo.kl import KL_ESTIMATORS
from megatron_guided.algo.policy_loss import POLICY_LOSSES
from megatron_guided.config import LOSS_AVG_MODES, ActorConfig, AlgorithmConfig, OptimConfig
from megatron_guided.train.batch import TrainBatch

STAT_NAMES = ("loss", "kl_loss", "entropy", "clipfrac", "ppo_kl", "rollout_logprob_abs_diff")


class PolicyObjective:
    """loss(mb) = agg(policy_loss(logp, old, A)) + kl_coef · agg(KL(logp ‖ ref)) where `agg` normalises by
    the token / sequence counts of the whole mini-batch (`global_tokens`, `global_seqs`), never of the
    micro-batch: summed over micro-batches (and data-parallel ranks) the gradient is that of the
    mini-batch loss, however it was split.

    The returned stats are additive over micro-batches too: `loss`/`kl_loss` are this micro-batch's
    share, the means are weighted by its share of the mini-batch tokens."""

    def __init__(self, actor: ActorConfig, algorithm: AlgorithmConfig, *, max_response_length: int):
        self.actor = actor
        self.loss_fn = POLICY_LOSSES[{"default": "ppo"}.get(actor.loss_type, actor.loss_type)]
        self.agg_mode = LOSS_AVG_MODES[actor.loss_avg_mode]
        self.kl_coef = algorithm.kl_coef if algorithm.use_kl_loss else 0.0
        self.kl_estimator = KL_ESTIMATORS[algorithm.kl_penalty]
        self.max_response_length = max_response_length

    def __call__(self, logp: Tensor, entropy: Tensor, mb: TrainBatch, *, global_tokens: Tensor,
                 global_seqs: int) -> tuple[Tensor, dict[str, float]]:
        old = logp.detach() if mb.old_logprobs is None else mb.old_logprobs
        kwargs: dict[str, Any] = {"clip_ratio_low": self.actor.clip_ratio_low,
                                  "clip_ratio_high": self.actor.clip_ratio_high}
        if self.actor.loss_type == "default":
            kwargs["clip_ratio_dual"] = self.actor.clip_ratio_dual if self.actor.clip_ratio_dual > 1 else None
        per_token, metrics = self.loss_fn(logp, old, mb.advantages, mb.loss_mask, **kwargs)

        def agg(values: Tensor) -> Tensor:
            return aggregate_loss(values, mb.loss_mask, mode=self.agg_mode, global_num_tokens=global_tokens,
                                  global_num_seqs=global_seqs, max_response_len=self.max_response_length)

        loss = agg(per_token)
        stats = dict.fromkeys(STAT_NAMES, 0.0)
        if self.kl_coef > 0 and mb.ref_logprobs is not None:
            kl_loss = agg(self.kl_estimator(logp, mb.ref_logprobs))
            loss = loss + self.kl_coef * kl_loss
            stats["kl_loss"] = float(kl_loss.detach())
        weight = float(mb.loss_mask.sum() / global_tokens)
        stats["loss"] = float(loss.detach())
        stats["entropy"] = float(masked_mean(entropy.detach(), mb.loss_mask)) * weight
        stats["clipfrac"] = float(masked_mean(metrics["clipfrac"], mb.loss_mask)) * weight
        stats["ppo_kl"] = float(masked_mean(metrics["approx_kl"], mb.loss_mask)) * weight
        stats["rollout_logprob_abs_diff"] = float(
            masked_mean((logp.detach() - mb.rollout_logprobs).abs(), mb.loss_mask)) * weight
        return loss, stats


def mini_batch_counts(mini: TrainBatch) -> tuple[Tensor, int]:
    """(trained tokens, trained sequences) of a mini-batch: the loss normalisers."""
    return mini.loss_mask.sum().clamp(min=1.0), int((mini.loss_mask.sum(-1) > 0).sum().clamp(min=1))


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """lr(step) / lr: linear warmup over `lr_warmup_steps` optimizer steps, then constant, linear or
    cosine decay to `min_lr_ratio` at `total_steps`."""
    warmup, floor = cfg.lr_warmup_steps, cfg.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_scheduler_type == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.lr_scheduler_type == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Weight decay applies to matrices only, not to biases and norm weights (Megatron's rule)."""
    return param.ndim > 1 and not name.endswith(".bias")
