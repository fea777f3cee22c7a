"""A verifier that is a Python function: ``worker.rollout.verifier.type=function``.

The function is given as ``path/to/file.py:name`` (``worker.rollout.verifier.function``) and called
as ``fn(request: VerifierRequest) -> str`` (sync or ``async def``), returning raw verifier text
(guidance or the stop token, optionally ``[SCORE] hallucination_detect=0|1`` lines) that is parsed
with :func:`~megatron_guided.verifier.base.parse_verifier_text`. A function that accepts a
``stop_token`` keyword (or ``**kwargs``) is passed the configured stop token.

Sync functions are called inline on the event loop: an exact checker runs in microseconds, far less
than a thread hop. Pass ``run_in_thread=True`` for a slow one (e.g. a symbolic solver) so that it
does not stall the other samples' rollouts.

Anything going wrong inside the function (an exception, a non-string result) becomes a FAILED reply
carrying the error; the rollout decides what to do with it (``on_failure``), it never crashes here.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

from megatron_guided.config import VerifierConfig
from megatron_guided.utils.loading import load_callable
from megatron_guided.verifier.base import (
    DEFAULT_STOP_TOKEN,
    VerdictKind,
    VerifierReply,
    VerifierRequest,
    parse_verifier_text,
)

__all__ = ["FunctionVerifier"]


class FunctionVerifier:
    """:class:`~megatron_guided.verifier.base.Verifier` over a user function returning verifier text."""

    def __init__(self, fn: Callable[..., Any], *, stop_token: str = DEFAULT_STOP_TOKEN, name: str | None = None,
                 run_in_thread: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"FunctionVerifier needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.stop_token = stop_token
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        self.run_in_thread = run_in_thread
        self._is_async = inspect.iscoroutinefunction(fn)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # some builtins / C callables
            params = {}
        takes_stop = "stop_token" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._kwargs = {"stop_token": stop_token} if takes_stop else {}

    @classmethod
    def from_config(cls, cfg: VerifierConfig) -> FunctionVerifier:
        fn = load_callable(cfg.function, what="worker.rollout.verifier.function")
        return cls(fn, stop_token=cfg.stop_token, name=cfg.function)

    async def verify(self, request: VerifierRequest) -> VerifierReply:
        start = time.perf_counter()
        try:
            if self._is_async:
                text = await self.fn(request, **self._kwargs)
            elif self.run_in_thread:
                text = await asyncio.to_thread(self.fn, request, **self._kwargs)
            else:
                text = self.fn(request, **self._kwargs)
                if inspect.isawaitable(text):  # a sync wrapper around a coroutine function
                    text = await text
            if not isinstance(text, str):
                raise TypeError(f"returned {type(text).__name__}, expected str")
        except Exception as exc:  # the user's bug must not take the rollout down
            return VerifierReply(kind=VerdictKind.FAILED, error=f"verifier function {self.name}: "
                                 f"{type(exc).__name__}: {exc}", latency_s=time.perf_counter() - start)
        reply = parse_verifier_text(text, stop_token=self.stop_token)
        reply.latency_s = time.perf_counter() - start
        return reply

    async def aclose(self) -> None:
        return None
