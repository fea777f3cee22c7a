"""A verifier that is a local language model: ``worker.rollout.verifier.type=model``.

Each ``verify`` renders :func:`~megatron_guided.verifier.prompt.build_verifier_messages` with the
verifier tokenizer's chat template (``add_generation_prompt=True``), generates one reply with the
verifier's own sampling (``temperature / top_p / top_k / max_tokens`` of :class:`VerifierConfig`; each
request gets the next seed of a counter starting at ``seed``), decodes it without special tokens and
parses it with :func:`~megatron_guided.verifier.base.parse_verifier_text`.

Concurrent ``verify`` calls (one per guided sample) reach the engine through
:func:`~megatron_guided.rollout.batcher.async_generator`: micro-batched into single engine calls in a
worker thread for the in-process engine (so that the event loop keeps going), sent one by one to a
served engine (``worker.rollout.verifier.engine=sglang``: the verifier model on its own SGLang
servers, never weight-synced). Any exception (rendering, a prompt the engine rejects, ...) becomes a
FAILED reply.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from megatron_guided.config import VerifierConfig
from pathlib import Path

from megatron_guided.models.vision import VisionProcessor, load_policy_model
from megatron_guided.rollout.batcher import async_generator
from megatron_guided.rollout.engine import GenerationEngine, GenerationRequest, SamplingParams
from megatron_guided.verifier.base import (
    DEFAULT_STOP_TOKEN,
    VerdictKind,
    VerifierReply,
    VerifierRequest,
    parse_verifier_text,
)
from megatron_guided.verifier.prompt import build_verifier_messages, load_system_prompt

__all__ = ["ModelVerifier"]


class ModelVerifier:
    """:class:`~megatron_guided.verifier.base.Verifier` over a :class:`GenerationEngine` and a tokenizer.

    Args:
        engine: the verifier model's engine (never the policy's: weights differ).
        tokenizer: the verifier's tokenizer; its chat template renders the prompt.
        system_prompt: the system message (default: the built-in prompt, stop token filled in).
        stop_token, temperature, top_p, top_k, max_tokens: as in :class:`VerifierConfig`
            (``temperature=0`` is greedy).
        seed: the first per-request seed; request i (in call order) uses ``seed + i``.
        batch_window_s, max_batch_size: micro-batching of an in-process engine (see
            :class:`~megatron_guided.rollout.batcher.AsyncBatchGenerator`).
        owns_engine: close the engine in :meth:`aclose` (true when :meth:`from_config` built it).
    """

    def __init__(self, engine: GenerationEngine, tokenizer: Any, *, system_prompt: str | None = None,
                 stop_token: str = DEFAULT_STOP_TOKEN, temperature: float = 0.2, top_p: float = 0.95,
                 top_k: int = -1, max_tokens: int = 256, seed: int = 0, batch_window_s: float = 0.002,
                 max_batch_size: int | None = None, owns_engine: bool = False,
                 processor: VisionProcessor | None = None) -> None:
        self.engine = engine
        self.owns_engine = owns_engine
        self.tokenizer = tokenizer
        self.processor = processor
        self.stop_token = stop_token
        self.system_prompt = system_prompt if system_prompt is not None else load_system_prompt(
            None, stop_token=stop_token)
        # Validated now, so a bad config fails at start rather than as FAILED replies.
        self.sampling = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        self.generator = async_generator(engine, window_s=batch_window_s, max_batch_size=max_batch_size)
        self._seeds = itertools.count(seed)

    @classmethod
    def from_config(cls, cfg: VerifierConfig, *, engine: GenerationEngine | None = None, tokenizer: Any = None,
                    seed: int = 0, device: str | None = None, dtype: Any = None,
                    log_dir: Path = Path("outputs/sglang/verifier")) -> ModelVerifier:
        """Tokenizer from ``cfg.tokenizer_path or cfg.model_path`` (unless given); without `engine`, the
        engine ``cfg.engine`` names on ``cfg.model_path``: SGLang servers from ``cfg.sglang`` (frozen, logs
        in `log_dir`), or an :class:`~megatron_guided.rollout.hf_engine.HFEngine` (CUDA in bfloat16 when
        available, else CPU in float32, unless `device` / `dtype` say otherwise)."""
        if tokenizer is None:
            from transformers import AutoTokenizer

            source = cfg.tokenizer_path or cfg.model_path
            if not source:
                raise ValueError("worker.rollout.verifier.model_path (or tokenizer_path) is required for type=model")
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        owns_engine = engine is None
        if engine is None and cfg.engine == "sglang":
            from megatron_guided.rollout.sglang.engine import SGLangEngine

            if not cfg.model_path:
                raise ValueError("worker.rollout.verifier.model_path is required for verifier.type=model")
            engine = SGLangEngine.from_config(cfg.sglang, model_path=cfg.model_path, log_dir=log_dir, frozen=True)
        elif engine is None:
            engine = _build_hf_engine(cfg, tokenizer, seed=seed, device=device, dtype=dtype)
        processor = None
        if cfg.multimodal:
            processor = VisionProcessor.from_pretrained(cfg.tokenizer_path or cfg.model_path, tokenizer=tokenizer)
        return cls(engine, tokenizer, system_prompt=load_system_prompt(cfg.prompt_template, stop_token=cfg.stop_token),
                   stop_token=cfg.stop_token, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                   max_tokens=cfg.max_tokens, seed=seed, owns_engine=owns_engine, processor=processor)

    # ------------------------------------------------------------------------------------------------------
    def render_prompt(self, request: VerifierRequest) -> str:
        """The verifier's prompt text (chat template applied, generation prompt added)."""
        messages = build_verifier_messages(request, system_prompt=self.system_prompt)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def engine_request(self, request: VerifierRequest, sampling: SamplingParams) -> GenerationRequest:
        """Text-only: the rendered prompt's ids. With a processor (verifier.multimodal) and images: the
        prompt with image parts, image tokens expanded once, and the images for the engine."""
        if self.processor is not None and request.images:
            messages = build_verifier_messages(request, system_prompt=self.system_prompt, multimodal=True)
            ids, vision = self.processor.encode_prompt(messages, request.images)
            return GenerationRequest(prompt_ids=ids, sampling=sampling, vision=vision)
        return GenerationRequest(prompt_ids=self.prompt_ids(request), sampling=sampling)

    def prompt_ids(self, request: VerifierRequest) -> list[int]:
        ids = self.tokenizer(self.render_prompt(request), add_special_tokens=False)["input_ids"]
        return [int(t) for t in ids]

    async def verify(self, request: VerifierRequest) -> VerifierReply:
        start = time.perf_counter()
        try:
            sampling = SamplingParams(max_new_tokens=self.sampling.max_new_tokens,
                                      temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                                      top_k=self.sampling.top_k, seed=next(self._seeds))
            completion = await self.generator.generate(self.engine_request(request, sampling))
            text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        except Exception as exc:
            return VerifierReply(kind=VerdictKind.FAILED, error=f"model verifier: {type(exc).__name__}: {exc}",
                                 latency_s=time.perf_counter() - start)
        reply = parse_verifier_text(text, stop_token=self.stop_token)
        reply.latency_s = time.perf_counter() - start
        return reply

    async def aclose(self) -> None:
        await self.generator.aclose()
        if self.owns_engine:
            self.engine.close()


def _build_hf_engine(cfg: VerifierConfig, tokenizer: Any, *, seed: int, device: str | None, dtype: Any):
    import torch

    from megatron_guided.rollout.hf_engine import HFEngine, eos_token_ids

    if not cfg.model_path:
        raise ValueError("worker.rollout.verifier.model_path is required for verifier.type=model")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = load_policy_model(cfg.model_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code).to(device).eval()
    return HFEngine(model, eos_token_ids=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, seed=seed)
