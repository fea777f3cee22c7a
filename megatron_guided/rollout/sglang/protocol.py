"""SGLang's native ``/generate`` wire format, both directions, as pure functions.

Checked against responses recorded from a real SGLang 0.5.23 server
(``../shared/reference/sglang-0.5.23-fixtures``) and against a live server in the tests.

* Request: ``input_ids`` (never text: the trajectory's tokens are sent as they are), the sampling
  parameters, ``return_logprob`` and, when the request has a seed, ``sampling_params.sampling_seed``
  (SGLang honours it only with ``--enable-deterministic-inference``, which its CPU attention backend
  does not support: on CPU, seeded sampled requests are not reproducible; greedy ones are).
  Stop strings are sent with ``no_stop_trim`` so that the returned text matches ``output_ids``, which
  always keep the stop-completing token (our :class:`SamplingParams` semantics).
* Images (vision-language models): ``image_data``, one PNG data URL per image in placeholder order,
  and in ``input_ids`` each image's run of ``<|image_pad|>`` tokens collapsed to a single one, since
  SGLang's Qwen-VL processor expands each ``<|vision_start|><|image_pad|><|vision_end|>`` itself (from
  the image grid it computes with the model's own image processor) and computes the m-RoPE positions
  of the expanded sequence. Our ``prompt_ids`` hold the expanded runs (the form the trainer scores),
  so images are expanded exactly once on either side; ``cached_tokens`` counts expanded positions.
  A generated image/video placeholder would be read as an image position on the next turn, so the
  placeholders are ``stop_token_ids``: a completion that emits one ends there, the placeholder is dropped
  from it and it finishes as ``STOP`` (SGLang's ``logit_bias`` could forbid them instead, but its
  log-probs would then be renormalised without them and no longer the policy's).
* Response: ``output_ids``; ``meta_info.output_token_logprobs`` as ``[logprob, token_id, text]``
  triples; ``meta_info.finish_reason`` (``{"type": "length"}``, ``{"type": "stop", "matched": <EOS id>}``,
  ``{"type": "stop", "matched": "<stop string>"}`` or ``{"type": "abort", "message": ...}``);
  ``meta_info.cached_tokens`` (prompt tokens served from the radix cache); ``meta_info.weight_version``.
* Log-probs: SGLang returns ``log(softmax(logits / T))`` before top-k/top-p truncation, and plain
  ``log_softmax(logits)`` for greedy requests, which is what ``Completion.logprobs`` means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_guided.rollout.engine import Completion, FinishReason, GenerationRequest

__all__ = [
    "ImageTokens",
    "SGLangProtocolError",
    "SGLangRequestAborted",
    "format_weight_version",
    "collapse_image_tokens",
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


@dataclass(frozen=True, slots=True)
class ImageTokens:
    """How a served vision-language model marks images in its token ids."""

    image_token_id: int
    """``<|image_pad|>``."""
    merge_size: int
    """``vision_config.spatial_merge_size``: an image of grid (t, h, w) takes t·h·w / merge² tokens."""
    video_token_id: int | None = None
    """``<|video_pad|>``."""

    @property
    def placeholders(self) -> list[int]:
        """The ids a completion must never contain."""
        return [t for t in (self.image_token_id, self.video_token_id) if t is not None]


def collapse_image_tokens(ids: Sequence[int], image_tokens: ImageTokens, tokens_per_image: Sequence[int]) -> list[int]:
    """``ids`` with each image's run of image tokens replaced by one image token.

    Checks that the runs are exactly the images' expansions (run k holds ``tokens_per_image[k]``
    tokens), so a prompt whose images were expanded twice, or not at all, fails here.
    """
    image = image_tokens.image_token_id
    out: list[int] = []
    runs: list[int] = []
    for i, token in enumerate(ids):
        if token != image:
            out.append(token)
        elif i > 0 and ids[i - 1] == image:
            runs[-1] += 1
        else:
            out.append(token)
            runs.append(1)
    if runs != list(tokens_per_image):
        raise ValueError(f"prompt_ids hold image-token runs of lengths {runs}; the request's images need "
                         f"{list(tokens_per_image)} (each image expanded exactly once, in order)")
    return out


def generate_payload(request: GenerationRequest, *, vocab_size: int | None = None,
                     image_tokens: ImageTokens | None = None,
                     image_data: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``POST /generate`` body for one request.

    Token ids are checked against ``vocab_size`` first: SGLang 0.5.23 crashes (the whole server
    exits) on an out-of-range id instead of rejecting the request. A request with ``vision`` needs
    the served model's ``image_tokens`` and its images encoded as ``image_data`` (PNG data URLs, see
    :func:`~megatron_guided.data.images.png_data_url`).
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
    if image_tokens is not None:
        params["stop_token_ids"] = image_tokens.placeholders
    payload: dict[str, Any] = {"input_ids": list(ids), "sampling_params": params, "return_logprob": True}
    if request.vision is not None:
        if image_tokens is None:
            raise ValueError("the request has images but the served model is not a vision-language model")
        if image_data is None or len(image_data) != request.vision.num_images:
            raise ValueError(f"the request has {request.vision.num_images} images, image_data has "
                             f"{None if image_data is None else len(image_data)}")
        payload["input_ids"] = collapse_image_tokens(
            ids, image_tokens, request.vision.tokens_per_image(image_tokens.merge_size))
        payload["image_data"] = list(image_data)
    return payload


def parse_completion(response: Any, *, prompt_len: int, placeholders: Sequence[int] = ()) -> Completion:
    """A :class:`Completion` from one ``/generate`` response object (raises naming the bad field).

    A completion that stopped on one of ``placeholders`` (the served model's image/video tokens, sent as
    ``stop_token_ids``) loses that last token and finishes as ``STOP``."""
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
    if output_ids and output_ids[-1] in placeholders and finish is FinishReason.EOS:
        output_ids, logprobs, finish = output_ids[:-1], logprobs[:-1], FinishReason.STOP
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
