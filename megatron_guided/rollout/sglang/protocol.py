"""SGLang's native ``/generate`` wire format, both directions, as pure functions.

Checked against responses recorded from a real SGLang 0.5.23 server
(``../shared/reference/sglang-0.5.23-fixtures``) and against a live server in the tests.

* Request: ``input_ids`` (never text: the trajectory's tokens are sent as they are), the sampling
  parameters, ``return_logprob`` and, when the request has a seed, ``sampling_params.sampling_seed``
  (SGLang honours it only with ``--enable-deterministic-inference``, which its CPU attention backend
  does not support: on CPU, seeded sampled requests are not reproducible; greedy ones are).
  Stop strings are sent with ``no_stop_trim`` so that the returned text matches ``output_ids``, which
  always keep the stop-completing token (our :class:`SamplingParams` semantics).
* Response: ``output_ids``; ``meta_info.output_token_logprobs`` as ``[logprob, token_id, text]``
  triples; ``meta_info.finish_reason`` (``{"type": "length"}``, ``{"type": "stop", "matched": <EOS id>}``,
  ``{"type": "stop", "matched": "<stop string>"}`` or ``{"type": "abort", "message": ...}``);
  ``meta_info.cached_tokens`` (prompt tokens served from the radix cache); ``meta_info.weight_version``.
* Log-probs: SGLang returns ``log(softmax(logits / T))`` before top-k/top-p truncation, and plain
  ``log_softmax(logits)`` for greedy requests, which is what ``Completion.logprobs`` means.
"""

from __future__ import annotations

from typing import Any

from megatron_guided.rollout.engine import Completion, FinishReason, GenerationRequest

__all__ = [
    "SGLangProtocolError",
    "SGLangRequestAborted",
    "format_weight_version",
    "generate_payload",
    "parse_completion",
    "parse_weight_version",
]

DEFAULT_WEIGHT_VERSION = "default"
"""What a server reports before its first update; maps to weight_version 0."""


class SGLangProtocolError(RuntimeError):
    """A response does not have the shape SGLang's /generate returns (names the field)."""


class SGLangRequestAborted(RuntimeError):
    """The server aborted the request (finish_reason type "abort"), e.g. it was paused with mode=abort."""


def generate_payload(request: GenerationRequest, *, vocab_size: int | None = None) -> dict[str, Any]:
    """The ``POST /generate`` body for one request.

    Token ids are checked against ``vocab_size`` first: SGLang 0.5.23 crashes (the whole server
    exits) on an out-of-range id instead of rejecting the request.
    """
    ids = request.prompt_ids
    if not ids:
        raise ValueError("GenerationRequest.prompt_ids must not be empty")
    if vocab_size is not None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"GenerationRequest.prompt_ids has ids outside the vocabulary [0, {vocab_size}): "
                             f"{bad[:8]}")
    s = request.sampling
    params: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p}
    if s.top_k != -1:
        params["top_k"] = s.top_k
    if s.stop:
        params["stop"] = list(s.stop)
        params["no_stop_trim"] = True
    if s.seed is not None:
        params["sampling_seed"] = s.seed
    return {"input_ids": list(ids), "sampling_params": params, "return_logprob": True}


def parse_completion(response: Any, *, prompt_len: int) -> Completion:
    """A :class:`Completion` from one ``/generate`` response object (raises naming the bad field)."""
    if not isinstance(response, dict):
        raise SGLangProtocolError(f"/generate response must be a JSON object, got {type(response).__name__}")
    output_ids = _field(response, "output_ids", list)
    meta = _field(response, "meta_info", dict)
    finish = _finish_reason(_field(meta, "finish_reason", dict, where="meta_info"))
    triples = _field(meta, "output_token_logprobs", list, where="meta_info")
    if len(triples) != len(output_ids):
        raise SGLangProtocolError(f"meta_info.output_token_logprobs has {len(triples)} entries for "
                                  f"{len(output_ids)} output_ids")
    logprobs = []
    for i, (triple, token) in enumerate(zip(triples, output_ids)):
        if not isinstance(triple, list) or len(triple) < 2 or triple[1] != token or triple[0] is None:
            raise SGLangProtocolError(f"meta_info.output_token_logprobs[{i}]={triple!r} does not match "
                                      f"output_ids[{i}]={token}")
        logprobs.append(float(triple[0]))
    cached = meta.get("cached_tokens", 0)
    if not isinstance(cached, int) or cached < 0:
        raise SGLangProtocolError(f"meta_info.cached_tokens must be a non-negative int, got {cached!r}")
    return Completion(token_ids=[int(t) for t in output_ids], logprobs=logprobs, finish_reason=finish,
                      cached_prompt_tokens=min(cached, prompt_len),
                      weight_version=parse_weight_version(meta.get("weight_version", DEFAULT_WEIGHT_VERSION)))


def format_weight_version(version: int) -> str:
    """Our integer weight_version as SGLang's string ``weight_version``."""
    return str(version)


def parse_weight_version(value: Any) -> int:
    """SGLang's ``weight_version`` string as our integer (``"default"``, a fresh server, is 0)."""
    if value == DEFAULT_WEIGHT_VERSION:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SGLangProtocolError(f"weight_version {value!r} is not one this engine set (an integer or "
                                  f"{DEFAULT_WEIGHT_VERSION!r}); was the server updated by someone else?") from None


def _finish_reason(reason: dict[str, Any]) -> FinishReason:
    kind = reason.get("type")
    if kind == "length":
        return FinishReason.LENGTH
    if kind == "stop":
        matched = reason.get("matched")
        if isinstance(matched, str):
            return FinishReason.STOP
        if isinstance(matched, int):
            return FinishReason.EOS
        raise SGLangProtocolError(f"meta_info.finish_reason.matched must be a token id or a string, got {matched!r}")
    if kind == "abort":
        raise SGLangRequestAborted(f"the server aborted the request: {reason.get('message')}")
    raise SGLangProtocolError(f"meta_info.finish_reason.type {kind!r} is not length, stop or abort")


def _field(obj: dict[str, Any], name: str, kind: type, *, where: str = "") -> Any:
    path = f"{where}.{name}" if where else name
    if name not in obj:
        raise SGLangProtocolError(f"/generate response has no {path}")
    value = obj[name]
    if not isinstance(value, kind):
        raise SGLangProtocolError(f"/generate response {path} must be a {kind.__name__}, got {type(value).__name__}")
    return value
