"""Async micro-batching over a synchronous, batched :class:`GenerationEngine`.

Many coroutines (one per sample of a guided rollout, or one per verifier call) each want one
completion; the engine is fastest when it gets them together. :class:`AsyncBatchGenerator` collects
the requests that arrive within a short window (``window_s``, default 2 ms, measured from the first
pending request; every request issued in the same event-loop tick is always in the same batch), sends
them to **one** ``engine.generate`` call in a worker thread (``asyncio.to_thread``, so the event loop
keeps serving verifier calls and other samples meanwhile), and resolves each caller's future with its
own completion.

* **One engine call at a time.** The engine is not assumed thread-safe: batches are dispatched one
  after another (requests arriving during a call form the next batch), and every engine call made
  through this class holds ``self.lock`` (share it with whoever else touches the engine, e.g. weight
  updates: ``with generator.lock: engine.update_weights(...)``).
* **Sessions.** Two pending requests with the same ``session_id`` never go into one call (the engine
  forbids it); the later one waits for the next batch. ``release_session`` is applied at once when the
  engine is idle, or right after the in-flight call otherwise (at the latest before the next call).
* **Failure isolation.** When a batched call raises, each of its requests is retried alone, so only
  the request(s) that fail on their own see the exception.
* **Cancellation.** A caller cancelled before dispatch is dropped from its batch; one cancelled while
  its batch runs simply never sees the result.
* Results equal calling ``engine.generate`` directly (seeded / greedy requests do not depend on their
  batch mates, see :mod:`megatron_guided.rollout.engine`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_guided.rollout.engine import (
    AsyncGenerator,
    Completion,
    GenerationEngine,
    GenerationRequest,
    ServedGenerationEngine,
)

__all__ = ["AsyncBatchGenerator", "async_generator"]


def async_generator(engine: GenerationEngine, *, window_s: float = 0.002,
                    max_batch_size: int | None = None) -> AsyncGenerator:
    """How async code should reach ``engine``: a served engine's own front (its servers batch
    continuously, so requests go out one by one, with no batch barrier), else micro-batching through an
    :class:`AsyncBatchGenerator` with ``window_s`` / ``max_batch_size``."""
    if isinstance(engine, ServedGenerationEngine):
        return engine.async_generator()
    return AsyncBatchGenerator(engine, window_s=window_s, max_batch_size=max_batch_size)


@dataclass(slots=True)
class _Pending:
    request: GenerationRequest
    future: asyncio.Future


class AsyncBatchGenerator:
    """``await generate(request) -> Completion`` over a sync ``engine.generate(list) -> list``.

    Args:
        engine: any :class:`GenerationEngine`.
        window_s: how long to wait for more requests after the first pending one (0: only the
            requests issued in the same event-loop tick are batched).
        max_batch_size: most requests per engine call (None: all pending).
        lock: the lock held around every engine call (a new one by default).
    """

    def __init__(self, engine: GenerationEngine, *, window_s: float = 0.002, max_batch_size: int | None = None,
                 lock: threading.Lock | None = None) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.engine = engine
        self.window_s = float(window_s)
        self.max_batch_size = max_batch_size
        self.lock = lock if lock is not None else threading.Lock()
        self._pending: list[_Pending] = []
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deferred_releases: list[str] = []
        self._closed = False
        self.num_engine_calls = 0
        """Engine calls made (a failed batch's one-by-one retries count too)."""
        self.num_requests = 0

    # ------------------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> Completion:
        """Complete one request, batched with whatever else is pending."""
        if self._closed:
            raise RuntimeError("AsyncBatchGenerator is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop (the old one's queue is gone with it)
            self._loop, self._worker, self._pending = loop, None, []
        future = loop.create_future()
        self._pending.append(_Pending(request, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        return await future

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Complete several requests (batched together with everything else pending), in order."""
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    def release_session(self, session_id: str) -> None:
        """Forget one session's cache: now when the engine is idle, else right after the current call."""
        self._deferred_releases.append(session_id)
        if self.lock.acquire(blocking=False):
            try:
                self._drain_releases()
            finally:
                self.lock.release()

    def _drain_releases(self) -> None:  # with self.lock held
        while self._deferred_releases:
            self.engine.release_session(self._deferred_releases.pop())

    async def aclose(self) -> None:
        """Finish the batch in flight; fail requests not yet dispatched."""
        self._closed = True
        pending, self._pending = self._pending, []
        for p in pending:
            if not p.future.done():
                p.future.set_exception(RuntimeError("AsyncBatchGenerator closed before this request ran"))
        worker = self._worker
        if worker is not None and not worker.done() and worker.get_loop() is asyncio.get_running_loop():
            await asyncio.gather(worker, return_exceptions=True)

    # ------------------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while self._pending:
            if self.window_s > 0:
                await asyncio.sleep(self.window_s)
            else:
                await asyncio.sleep(0)  # let the callers issued in this tick enqueue
            batch = self._take_batch()
            if not batch:
                continue
            try:
                outcomes = await asyncio.to_thread(self._call_engine, [p.request for p in batch])
            except asyncio.CancelledError:
                for p in batch:
                    p.future.cancel()
                raise
            except Exception as exc:  # the thread could not run at all (e.g. executor shut down)
                outcomes = [exc] * len(batch)
            for p, outcome in zip(batch, outcomes):
                if p.future.done():  # cancelled meanwhile
                    continue
                if isinstance(outcome, BaseException):
                    p.future.set_exception(outcome)
                else:
                    p.future.set_result(outcome)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rest: list[_Pending] = []
        sessions: set[str] = set()
        for p in self._pending:
            if p.future.done():  # cancelled before dispatch
                continue
            sid = p.request.session_id
            full = self.max_batch_size is not None and len(batch) >= self.max_batch_size
            if full or (sid is not None and sid in sessions):
                rest.append(p)
                continue
            if sid is not None:
                sessions.add(sid)
            batch.append(p)
        self._pending = rest
        return batch

    def _call_engine(self, requests: list[GenerationRequest]) -> list[Completion | BaseException]:
        """Worker thread: one engine call (then one per request if it raised), then deferred releases."""
        with self.lock:
            self._drain_releases()
            try:
                self.num_engine_calls += 1
                self.num_requests += len(requests)
                try:
                    results: list[Completion | BaseException] = list(self.engine.generate(requests))
                    if len(results) != len(requests):
                        raise RuntimeError(f"engine returned {len(results)} completions for {len(requests)} requests")
                except Exception as exc:
                    if len(requests) == 1:
                        return [exc]
                    results = []
                    for request in requests:
                        self.num_engine_calls += 1
                        try:
                            results.append(self.engine.generate([request])[0])
                        except Exception as single_exc:
                            results.append(single_exc)
                return results
            finally:
                self._drain_releases()
