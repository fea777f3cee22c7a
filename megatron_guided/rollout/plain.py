"""Open-loop (unguided) rollouts: each prompt sampled n times in one turn."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from megatron_guided.data.dataset import PromptSample
from megatron_guided.rollout.engine import FinishReason, GenerationEngine, GenerationRequest, SamplingParams
from megatron_guided.rollout.trajectory import Trajectory, TrajectoryStatus

_SEED_STRIDE = 1_000_003


def sample_seed(base_seed: int, step: int, group: int, sample: int) -> int:
    """A distinct, reproducible 63-bit seed per (step, group, sample): samples never share one
    (distinct for step, group < 1,000,003 and sample < 4099)."""
    return (((base_seed * _SEED_STRIDE + step) * _SEED_STRIDE + group) * 4099 + sample) % (2**63 - 1)


def finish_status(reason: FinishReason) -> TrajectoryStatus:
    return TrajectoryStatus.TRUNCATED if reason is FinishReason.LENGTH else TrajectoryStatus.COMPLETED


def plain_rollout(engine: GenerationEngine, prompts: Sequence[PromptSample], *, n: int,
                  sampling: SamplingParams, base_seed: int, step: int) -> list[Trajectory]:
    """n trajectories per prompt, ordered p0×n, p1×n, …; group_id is the prompt's position."""
    trajectories, requests = [], []
    for group, prompt in enumerate(prompts):
        for k in range(n):
            seed = sample_seed(base_seed, step, group, k)
            trajectories.append(Trajectory(prompt_ids=list(prompt.prompt_ids), group_id=group, sample_seed=seed,
                                           ground_truth=prompt.ground_truth, prompt_index=prompt.index,
                                           extra={"slot": k}, vision=prompt.vision))
            requests.append(GenerationRequest(prompt_ids=list(prompt.prompt_ids), vision=prompt.vision,
                                              sampling=dataclasses.replace(sampling, seed=seed)))
    for traj, completion in zip(trajectories, engine.generate(requests)):
        traj.append(completion.token_ids, completion.logprobs, trainable=True)
        traj.status = finish_status(completion.finish_reason)
        traj.weight_version = completion.weight_version
        traj.extra["finish_reason"] = str(completion.finish_reason)
    return trajectories
