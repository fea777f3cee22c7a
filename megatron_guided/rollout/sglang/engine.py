"""``SGLangEngine``: the :class:`~megatron_guided.rollout.engine.GenerationEngine` over SGLang servers.

Every request is its own ``POST /generate`` (token ids in, token ids + log-probs out, see
:mod:`.protocol`); the servers batch continuously, so many requests are simply kept in flight.
The HTTP client lives on a private event loop (:class:`~megatron_guided.utils.loop_thread.LoopThread`),
which makes the engine usable from synchronous code (``generate``, plain rollouts), from worker
threads, and from other event loops (``agenerate`` / :meth:`SGLangEngine.async_generator`, used by
guided rollouts and model verifiers, with no batching barrier between samples).

Sessions map onto SGLang's radix cache: a request with a ``session_id`` is routed to the replica that
served the session before (sticky routing), where its earlier prompt + completion are cached;
``Completion.cached_prompt_tokens`` is the server's ``cached_tokens``. The radix cache also shares
prefixes across sessions (the n samples of one prompt), and evicts by LRU, so ``release_session`` only
drops the routing entry.

Images (vision-language policies and verifiers): a request's ``vision.images`` go as ``image_data``
(PNG data URLs, encoded once per image however many turns, samples and verifier calls re-send it, see
:class:`~megatron_guided.data.images.EncodedImages`) and each image's token run is collapsed for SGLang to expand (see
:mod:`.protocol`). Every turn re-sends the images, and SGLang's radix cache keys image tokens by image
content, so the earlier turns' prefix is still served from the cache. A completion that emits an
image/video placeholder ends there without it (see :mod:`.protocol`).

``update_weights``: pause generation → weight sync (:mod:`.weight_sync`) stamped with the new
``weight_version`` → flush the radix cache → continue → check that every server reports the new
version. An engine without a weight sync is frozen (the verifier) and refuses updates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from megatron_guided.config import SGLangConfig
from megatron_guided.data.images import EncodedImages
from megatron_guided.models.qwen2_5_vl import checkpoint_name
from megatron_guided.rollout.engine import AsyncGenerator, Completion, GenerationRequest
from megatron_guided.rollout.sglang.client import SGLangClient
from megatron_guided.rollout.sglang.protocol import (
    ImageTokens,
    format_weight_version,
    generate_payload,
    parse_completion,
    parse_weight_version,
)
from megatron_guided.rollout.sglang.server import SGLangServer, SGLangServerError, start_servers
from megatron_guided.rollout.sglang.weight_sync import WeightSync, weight_sync_from_config
from megatron_guided.utils.loop_thread import LoopThread

__all__ = ["SGLangEngine", "image_tokens_of"]

log = logging.getLogger(__name__)

SGLANG_QWEN2_5_VL_PATCH_DIM = 1176
"""SGLang 0.5.23's ``Qwen2_5_VLForConditionalGeneration.get_image_feature`` runs the vision tower only
on ``pixel_values`` rows of exactly this width (3 channels · temporal patch 2 · 14 · 14, the released
checkpoints' patches); rows of any other width are taken as precomputed embeddings and crash or, worse,
skip the tower."""


def image_tokens_of(config) -> ImageTokens | None:
    """The image tokens of a served HF config (None for a text model); refuses a Qwen2.5-VL whose patch
    size SGLang cannot serve (:data:`SGLANG_QWEN2_5_VL_PATCH_DIM`), naming the field."""
    vision = getattr(config, "vision_config", None)
    if vision is None or getattr(config, "image_token_id", None) is None:
        return None
    if config.model_type == "qwen2_5_vl":
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        if width != SGLANG_QWEN2_5_VL_PATCH_DIM:
            raise ValueError(f"vision_config.patch_size={vision.patch_size} gives {width}-wide image patches; SGLang "
                             f"serves Qwen2.5-VL only with {SGLANG_QWEN2_5_VL_PATCH_DIM}-wide ones (patch_size=14, "
                             "as released): use worker.rollout.engine=hf for this model, or build it with "
                             "tools/make_tiny_model.py --patch-size 14")
    video = getattr(config, "video_token_id", None)
    return ImageTokens(image_token_id=int(config.image_token_id), merge_size=int(vision.spatial_merge_size),
                       video_token_id=None if video is None else int(video))


class SGLangEngine:
    """``GenerationEngine`` over one or more SGLang servers.

    Args:
        servers: launched or attached servers (launched ones are stopped by :meth:`close`).
        vocab_size: prompt ids are checked against it before sending (an out-of-range id crashes
            SGLang 0.5.23 instead of being rejected).
        weight_sync: how :meth:`update_weights` reaches the servers; None = frozen (never updated).
        image_tokens: the served model's image tokens (:func:`image_tokens_of`); None = text-only, and
            requests with images are refused.
        device: the servers' device; ``cpu`` refuses memory release (it crashes SGLang's CPU engine).
        pause_mode: ``/pause_generation`` mode around weight updates (abort | retract | in_place).
        timeout_s, max_retries, retry_interval_s: see :class:`SGLangClient`.
    """

    def __init__(self, servers: Sequence[SGLangServer], *, vocab_size: int | None,
                 weight_sync: WeightSync | None = None, image_tokens: ImageTokens | None = None,
                 device: str = "cuda", pause_mode: str = "in_place",
                 timeout_s: float = 600.0, max_retries: int = 3, retry_interval_s: float = 0.5) -> None:
        self.servers = list(servers)
        self.vocab_size = vocab_size
        self.image_tokens = image_tokens
        self.encoded_images = EncodedImages()
        self.weight_sync = weight_sync
        self.device = device
        self.pause_mode = pause_mode
        self.client = SGLangClient(self.servers, timeout_s=timeout_s, max_retries=max_retries,
                                   retry_interval_s=retry_interval_s)
        self._loop = LoopThread(name="sglang-engine")
        self._closed = False
        try:
            versions = {parse_weight_version(info["weight_version"]) for info in self._run(self.model_info())}
        except BaseException:
            self.close()
            raise
        if len(versions) != 1:
            self.close()
            raise RuntimeError(f"the SGLang servers report different weight versions {sorted(versions)}")
        self.weight_version: int = versions.pop()

    @classmethod
    def from_config(cls, cfg: SGLangConfig, *, model_path: str, log_dir: Path, weight_sync_dir: Path | None = None,
                    frozen: bool = False) -> SGLangEngine:
        """Launch (or attach to) the servers of ``cfg`` serving ``model_path``; the weight sync from
        ``cfg.weight_sync`` unless ``frozen`` (disk sync writes under ``cfg.weight_sync_dir`` or
        ``weight_sync_dir``)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
        vocab_size = int(config.get_text_config().vocab_size)
        image_tokens = image_tokens_of(config)
        weight_sync = None if frozen else weight_sync_from_config(cfg, default_dir=weight_sync_dir)
        servers = start_servers(model_path, cfg, log_dir=log_dir)
        try:
            return cls(servers, vocab_size=vocab_size, weight_sync=weight_sync, image_tokens=image_tokens,
                       device=cfg.device,
                       pause_mode=cfg.pause_mode, timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries,
                       retry_interval_s=cfg.retry_interval_s)
        except BaseException:
            for server in servers:
                server.stop()
            raise

    # -- GenerationEngine -----------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """All requests in flight at once; results in request order. If one fails, the others are
        cancelled and its error is raised."""
        return self._run(self._generate_all(list(requests)))

    async def agenerate(self, request: GenerationRequest) -> Completion:
        """One request, awaited from any event loop."""
        return await self._loop.wrap(self._generate_one(request))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.weight_sync is None:
            raise RuntimeError("this SGLang engine is frozen (no weight sync configured): it serves a fixed "
                               "model such as the verifier and is never updated")
        if self.image_tokens is not None:  # SGLang's loader reads saved-checkpoint names, not transformers 5's
            named_tensors = ((checkpoint_name(name), tensor) for name, tensor in named_tensors)
        version = self.weight_version + 1
        self._run(self._update(named_tensors, version))
        self.weight_version = version

    def release_session(self, session_id: str) -> None:
        self._loop.loop.call_soon_threadsafe(self.client.release_session, session_id)

    def flush_cache(self) -> None:
        self._run(self._flush())

    def close(self) -> None:
        """Close the HTTP client and stop the servers this engine launched. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self.client.aclose())
        finally:
            self._loop.close()
            for server in self.servers:
                server.stop()

    # -- beyond the protocol --------------------------------------------------------------------------
    def async_generator(self) -> AsyncGenerator:
        """The async front for guided rollouts / model verifiers: each request goes out at once."""
        return _AsyncFront(self)

    async def model_info(self) -> list[dict]:
        return await self.client.call_all("/model_info", method="GET")

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Colocated GPU mode: free weights and/or KV cache (``tags``, default all) while training runs."""
        self._refuse_on_cpu("release_memory_occupation")
        self._run(self.client.call_all("/release_memory_occupation", {"tags": tags}))

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Re-allocate what :meth:`release_memory` freed (then update the weights)."""
        self._refuse_on_cpu("resume_memory_occupation")
        self._run(self.client.call_all("/resume_memory_occupation", {"tags": tags}))

    # -- internals ------------------------------------------------------------------------------------
    def _run(self, coro):
        if self._closed:
            coro.close()
            raise RuntimeError("SGLangEngine is closed")
        return self._loop.run(coro)

    def _refuse_on_cpu(self, what: str) -> None:
        if self.device == "cpu":
            raise RuntimeError(f"{what} is GPU-only: SGLang's CPU engine crashes on it, so it is never called "
                               "with device=cpu (colocated memory release needs worker.rollout.sglang.device=cuda)")

    async def _generate_one(self, request: GenerationRequest) -> Completion:
        payload = generate_payload(request, vocab_size=self.vocab_size, image_tokens=self.image_tokens,
                                   image_data=None if request.vision is None
                                   else self.encoded_images.urls(request.vision.images))
        answer = await self.client.generate(payload, session_id=request.session_id)
        return parse_completion(answer, prompt_len=len(request.prompt_ids),
                                placeholders=self.image_tokens.placeholders if self.image_tokens else ())

    async def _generate_all(self, requests: list[GenerationRequest]) -> list[Completion]:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._generate_one(r)) for r in requests]
        except ExceptionGroup as failed:  # one error for the caller: a dead server explains the rest
            errors = list(failed.exceptions)
            raise next((e for e in errors if isinstance(e, SGLangServerError)), errors[0]) from None
        return [t.result() for t in tasks]

    async def _update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        expected = format_weight_version(version)
        await self.client.call_all("/pause_generation", {"mode": self.pause_mode})
        try:
            await self.weight_sync.push(self.client, named_tensors, version=expected)
            await self._flush()
        finally:
            await self.client.call_all("/continue_generation", {})
        reported = [info.get("weight_version") for info in await self.model_info()]
        if any(v != expected for v in reported):
            raise RuntimeError(f"after the weight update the servers report weight_version {reported}, "
                               f"expected {expected!r}")
        log.info("sglang weights updated to version %s on %d server(s)", expected, len(self.servers))

    async def _flush(self) -> None:
        await self.client.call_all("/flush_cache", expect_json=False)


class _AsyncFront:
    """:class:`AsyncGenerator` over an :class:`SGLangEngine` (its owner closes the engine)."""

    def __init__(self, engine: SGLangEngine) -> None:
        self.engine = engine

    async def generate(self, request: GenerationRequest) -> Completion:
        return await self.engine.agenerate(request)

    def release_session(self, session_id: str) -> None:
        self.engine.release_session(session_id)

    async def aclose(self) -> None:
        """Nothing to release here: requests in flight finish or are cancelled by their callers."""
