"""Load and call user reward functions given as ``path/to/file.py:function_name``.

Two forms, as in EasyR1:
- ``batch``: ``fn(reward_inputs: list[dict], **kwargs) -> list[dict[str, float]]``
- ``sequential``: ``fn(reward_input: dict, **kwargs) -> dict[str, float]``

Each input dict has ``response`` (the policy's own text: verifier/context tokens are never
included), ``response_length`` (policy tokens), ``ground_truth``, ``num_turns`` and
``finish_reason``. Each output dict must hold ``overall`` (the scalar reward); other keys are
logged as ``reward/<key>``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from megatron_guided.utils.loading import LoadError, load_callable

RewardInput = dict[str, Any]
RewardOutput = dict[str, float]


class RewardFunctionError(LoadError):
    """The reward function cannot be loaded, or returned something unusable."""


def load_reward_function(spec: str) -> Callable[..., Any]:
    return load_callable(spec, what="worker.reward.reward_function", error=RewardFunctionError)


class RewardManager:
    """Calls the configured reward function on a batch of reward inputs and checks its outputs."""

    def __init__(self, spec: str, *, reward_type: str, kwargs: dict[str, Any] | None = None):
        self.fn = load_reward_function(spec)
        self.spec = spec
        self.reward_type = reward_type
        self.kwargs = dict(kwargs or {})
        params = inspect.signature(self.fn).parameters
        accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = [k for k in self.kwargs if k not in params and not accepts_var_kw]
        if unknown:
            raise RewardFunctionError(
                f"worker.reward.reward_function_kwargs has {unknown}, which {spec} does not accept; "
                f"its parameters: {list(params)}")

    def __call__(self, inputs: list[RewardInput]) -> list[RewardOutput]:
        if self.reward_type == "batch":
            outputs = list(self.fn(inputs, **self.kwargs))
        else:
            outputs = [self.fn(item, **self.kwargs) for item in inputs]
        if len(outputs) != len(inputs):
            raise RewardFunctionError(f"{self.spec} returned {len(outputs)} scores for {len(inputs)} inputs")
        for i, out in enumerate(outputs):
            if not isinstance(out, dict) or "overall" not in out:
                raise RewardFunctionError(f"{self.spec} output {i} must be a dict with an 'overall' key, got {out!r}")
        return [{k: float(v) for k, v in out.items()} for out in outputs]
