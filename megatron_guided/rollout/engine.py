"""The generation-engine seam: request/response types and the ``GenerationEngine`` protocol.

Everything the rollout side needs from an inference backend goes through this module, so that the
in-process transformers engine (:mod:`megatron_guided.rollout.hf_engine`) and any future backend (a
vLLM / SGLang server, a Megatron inference engine, ...) are interchangeable.

This module is pure types: it imports no model code (torch only for type checking).

Semantics shared by every engine
--------------------------------
* **Token-in / token-out.** Prompts are token ids and completions are token ids; chat templating and
  detokenisation for rewards are the caller's business (stop strings are the one exception, see below).
* **Log-probs.** ``Completion.logprobs[i]`` is the log-probability of ``token_ids[i]`` under the
  *sampling* distribution before truncation: ``log_softmax(logits / temperature)`` evaluated at the
  chosen token, computed in float32, **before** top-k / top-p filtering (so it is the same quantity the
  trainer recomputes from the policy at that temperature). For greedy decoding (``temperature == 0``)
  it is the plain ``log_softmax(logits)``.
* **Finishing.** A sequence finishes on the first of: an EOS token (the EOS token *is* included in the
  output, ``FinishReason.EOS``), a stop string (see :class:`SamplingParams`, ``FinishReason.STOP``), or
  ``max_new_tokens`` generated tokens (``FinishReason.LENGTH``).
* **Sessions.** A request with a ``session_id`` leaves its KV cache in the engine after it finishes; a
  later request with the same ``session_id`` reuses that cache for the longest common prefix of its
  ``prompt_ids`` and the ids the cache covers (typically the previous prompt + the previous completion,
  so a multi-turn rollout only prefills the new turn). Reuse never changes results, only speed
  (up to float rounding); ``Completion.cached_prompt_tokens`` reports how many prompt tokens were served
  from the cache. Sessions are dropped by ``release_session``, ``flush_cache`` and ``update_weights``.
* **Images.** A vision-language request carries ``vision`` (:class:`~megatron_guided.models.vision.
  VisionInputs`): ``prompt_ids`` already hold every image's tokens, expanded once by the data loader,
  so engines never expand or re-tokenise. Every turn of a dialogue sends the same ``vision`` (the
  images stay in the context). The in-process engine feeds ``pixel_values`` / ``image_grid_thw`` and
  m-RoPE positions; an HTTP engine such as SGLang sends ``vision.images`` (PIL, placeholder order)
  as ``image_data`` next to ``input_ids``. A completion never contains an image/video placeholder
  token (the next turn would read it as an image position): the in-process engine never samples one
  (its reported log-probs stay the full distribution's), SGLang ends the completion where the policy
  emits one and drops it (``STOP``). Either way every kept token's log-prob is the policy's own.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from megatron_guided.models.vision import VisionInputs

__all__ = [
    "AsyncGenerator",
    "Completion",
    "FinishReason",
    "GenerationEngine",
    "GenerationRequest",
    "SamplingParams",
    "ServedGenerationEngine",
]


class FinishReason(str, enum.Enum):
    """Why a completion ended."""

    EOS = "eos"  # an EOS token was generated (and is the last output token)
    STOP = "stop"  # a stop string was generated
    LENGTH = "length"  # max_new_tokens was reached

    def __str__(self) -> str:  # "eos", not "FinishReason.EOS"
        return self.value


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """How to sample one request.

    Attributes:
        max_new_tokens: maximum number of generated tokens (>= 1).
        temperature: softmax temperature; ``0`` means greedy (argmax) decoding. Must be >= 0.
        top_p: nucleus sampling mass in ``(0, 1]``, applied *after* top-k on the renormalised top-k
            distribution; the most likely token is always kept. ``1.0`` disables it.
        top_k: keep only the ``top_k`` most likely tokens (>= 1), or ``-1`` to disable.
        stop: stop strings. Generation stops at the first generated token whose decoding completes one
            of them, and that token is **kept** in the output (OpenAI/vLLM
            ``include_stop_str_in_output=True`` semantics), so the decoded output ends with the stop
            string (or, when the completing token extends past it, with that whole token: the output is
            cut at token granularity because token ids and log-probs must stay aligned). Only generated
            text is searched, never the prompt. Requires the engine to know how to decode ids.
        seed: per-request seed. The same request with the same seed produces the same tokens regardless
            of the other requests in the batch and of its position in it. ``None`` draws a seed from the
            engine's own generator (reproducible for a seeded engine and a fixed call sequence).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise ValueError(f"temperature must be a float, got {self.temperature!r}")
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool):
            raise ValueError(f"top_p must be a float, got {self.top_p!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or -1 (disabled), got {self.top_k}")
        if isinstance(self.stop, str) or not isinstance(self.stop, tuple):
            raise ValueError(f"stop must be a tuple of strings, got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain non-empty strings, got {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(kw_only=True, slots=True)
class GenerationRequest:
    """One prompt to complete.

    Attributes:
        prompt_ids: the prompt token ids (non-empty).
        sampling: how to sample.
        session_id: when set, the engine keeps this sequence's KV cache after generation, so a later
            request with the same ``session_id`` whose ``prompt_ids`` extend (previous prompt_ids +
            previous generated ids) prefills only the new suffix. At most one request per session_id
            per ``generate`` call.
        vision: the images of the prompt (see "Images" above); None for text-only prompts.
    """

    prompt_ids: list[int]
    sampling: SamplingParams
    session_id: str | None = None
    vision: VisionInputs | None = None


@dataclass(kw_only=True, slots=True)
class Completion:
    """The result for one request (``generate`` returns them in request order).

    Attributes:
        token_ids: generated token ids (EOS / stop-completing token included when that ended it).
        logprobs: per generated token, ``log_softmax(logits / temperature)`` at that token in float32,
            before top-k/top-p truncation (plain ``log_softmax`` for greedy). Same length as token_ids.
        finish_reason: why generation ended.
        cached_prompt_tokens: how many prompt tokens were served from a session's KV cache (0 without
            reuse).
        weight_version: the engine's ``weight_version`` when this completion was generated.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    cached_prompt_tokens: int = 0
    weight_version: int = 0


@runtime_checkable
class GenerationEngine(Protocol):
    """What the rollout side needs from an inference backend."""

    weight_version: int
    """Incremented by every ``update_weights``; stamped on every completion."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Complete every request; results in request order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (HF parameter names), drop all session caches and bump
        ``weight_version``. Unknown names are an error."""
        ...

    def release_session(self, session_id: str) -> None:
        """Forget one session's cache (no-op if unknown)."""
        ...

    def flush_cache(self) -> None:
        """Forget every session's cache."""
        ...

    def close(self) -> None:
        """Release what the engine holds (caches; server processes and connections for a served
        engine). Idempotent."""
        ...


@runtime_checkable
class AsyncGenerator(Protocol):
    """One completion per ``await generate(request)``, for async callers (guided rollouts, model
    verifiers): :class:`~megatron_guided.rollout.batcher.AsyncBatchGenerator` over an in-process engine,
    or a served engine's own front."""

    async def generate(self, request: GenerationRequest) -> Completion:
        ...

    def release_session(self, session_id: str) -> None:
        ...

    async def aclose(self) -> None:
        ...


@runtime_checkable
class ServedGenerationEngine(GenerationEngine, Protocol):
    """An engine behind servers that take requests one by one and batch them continuously themselves:
    async callers use its own front (no batching barrier) instead of micro-batching synchronous calls."""

    def async_generator(self) -> AsyncGenerator:
        ...
