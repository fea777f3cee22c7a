"""A generation engine in a Ray actor, and `RemoteEngine`, the `GenerationEngine` the rollout side
holds for it.

The actor builds its engine itself from a picklable factory (so the model is loaded where it runs,
never shipped), and serves the protocol's calls one at a time. The in-process HF engine goes here on
CPU; the SGLang engines (issue 7) take the same slot with a factory that starts a server on the slot's
GPUs. Weight updates travel as one list of HF-named tensors through the object store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import ray
import torch

from megatron_guided.rollout.engine import Completion, GenerationEngine, GenerationRequest


class EngineActor:
    def __init__(self, factory: Callable[[], GenerationEngine], threads: int):
        torch.set_num_threads(threads)
        self.engine = factory()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return self.engine.generate(requests)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        self.engine.update_weights(named_tensors)
        return self.engine.weight_version

    def release_session(self, session_id: str) -> None:
        self.engine.release_session(session_id)

    def flush_cache(self) -> None:
        self.engine.flush_cache()

    def close(self) -> None:
        self.engine.close()


class RemoteEngine:
    """`GenerationEngine` calls forwarded to an `EngineActor`; a failure in the actor raises here."""

    def __init__(self, actor):
        self.actor = actor
        self.weight_version = 0

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return ray.get(self.actor.generate.remote(list(requests)))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.weight_version = ray.get(self.actor.update_weights.remote(list(named_tensors)))

    def release_session(self, session_id: str) -> None:
        self.actor.release_session.remote(session_id)  # not awaited: the actor runs calls in order

    def flush_cache(self) -> None:
        ray.get(self.actor.flush_cache.remote())

    def close(self) -> None:
        """Close the engine inside its actor (an SGLang engine stops its servers there); the actor goes
        with the Ray cluster. An actor that is already gone has nothing left to close."""
        try:
            ray.get(self.actor.close.remote())
        except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError):
            pass
