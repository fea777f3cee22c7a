"""The token-level trajectory: one growing token sequence per sample.

A trajectory is the prompt followed by everything appended after it, policy tokens and context
tokens (verifier replies, chat-template glue) alike. It is never re-rendered or re-tokenised:
what the trainer sees is exactly what the engine sampled or was fed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class TrajectoryStatus(str, enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    """The policy ended its answer (EOS, stop string, or the verifier accepted it)."""
    TRUNCATED = "truncated"
    """A token budget ran out before the policy finished."""
    ABORTED = "aborted"

    def is_truncated(self) -> bool:
        return self is TrajectoryStatus.TRUNCATED


@dataclass(kw_only=True, slots=True)
class Trajectory:
    prompt_ids: list[int]
    """The rendered prompt (chat template applied). # [num_prompt_tokens]"""
    group_id: int
    """Samples of the same prompt in the same step share it (the GRPO group)."""
    sample_seed: int
    ground_truth: str = ""
    prompt_index: int = -1
    """Position of the prompt in its dataset."""
    response_ids: list[int] = field(default_factory=list)
    """Every token after the prompt. # [num_response_tokens]"""
    loss_mask: list[int] = field(default_factory=list)
    """1 for policy tokens (trained), 0 for context tokens. # [num_response_tokens]"""
    rollout_logprobs: list[float] = field(default_factory=list)
    """Sampling logprob of each policy token; 0.0 for context tokens. # [num_response_tokens]"""
    status: TrajectoryStatus = TrajectoryStatus.RUNNING
    num_turns: int = 0
    weight_version: int = 0
    guided: bool = False
    """Whether the verifier was in this sample's loop."""
    num_corrections: int = 0
    """Verifier replies injected into the context (guidance and finish-up requests)."""
    hallucination_flags: list[int] = field(default_factory=list)
    """The verifier's [SCORE] hallucination_detect flags, in order (1 = no hallucination)."""
    verifier_failures: int = 0
    reward: float | None = None
    reward_breakdown: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    vision: Any = None
    """The prompt's :class:`~megatron_guided.models.vision.VisionInputs` (None for text-only prompts):
    the images stay in the context for every turn and go to the trainer with the tokens."""

    def append(self, tokens: list[int], logprobs: list[float] | None, *, trainable: bool) -> None:
        """Append tokens; policy tokens need their sampling logprobs, context tokens must not have any."""
        if trainable:
            if logprobs is None or len(logprobs) != len(tokens):
                raise ValueError(
                    f"trainable append needs one logprob per token: {len(tokens)} tokens, "
                    f"{None if logprobs is None else len(logprobs)} logprobs")
            self.rollout_logprobs.extend(float(x) for x in logprobs)
            self.num_turns += 1
        else:
            if logprobs is not None:
                raise ValueError("context (trainable=False) tokens carry no logprobs")
            self.rollout_logprobs.extend([0.0] * len(tokens))
        self.response_ids.extend(int(t) for t in tokens)
        self.loss_mask.extend([int(trainable)] * len(tokens))
        if not len(self.response_ids) == len(self.loss_mask) == len(self.rollout_logprobs):
            raise ValueError(
                f"trajectory arrays out of step: {len(self.response_ids)} ids, "
                f"{len(self.loss_mask)} mask, {len(self.rollout_logprobs)} logprobs")

    @property
    def num_policy_tokens(self) -> int:
        return sum(self.loss_mask)

    def policy_turn_spans(self) -> list[tuple[int, int]]:
        """[start, end) of each policy turn in response_ids (maximal runs of mask 1)."""
        spans, start = [], None
        for i, m in enumerate(self.loss_mask + [0]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                spans.append((start, i))
                start = None
        return spans

    def train_final_turn_only(self) -> None:
        """Keep only the last policy turn trainable (the original Guided-GRPO's `final_turn` scope);
        earlier turns stay in the sequence as context."""
        spans = self.policy_turn_spans()
        for start, end in spans[:-1]:
            for i in range(start, end):
                self.loss_mask[i] = 0
                self.rollout_logprobs[i] = 0.0

    @property
    def final_turn_token_ids(self) -> list[int]:
        """The policy's last turn (its final answer, in a guided dialogue)."""
        spans = self.policy_turn_spans()
        return self.response_ids[spans[-1][0] : spans[-1][1]] if spans else []

    @property
    def policy_token_ids(self) -> list[int]:
        """The tokens the policy generated, context tokens left out (what rewards read)."""
        return [t for t, m in zip(self.response_ids, self.loss_mask) if m]

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__slots__}
        out["status"] = self.status.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        data = dict(data)
        data["status"] = TrajectoryStatus(data["status"])
        return cls(**data)
