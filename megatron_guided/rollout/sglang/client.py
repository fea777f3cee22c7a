"""Async HTTP to SGLang replicas: retries, sticky routing by session, dead-server detection.

* **Routing.** A request without a session goes to the replica with the fewest requests in flight. A
  request with a ``session_id`` (one guided sample) goes to the replica its session was first routed
  to, so every turn of a sample hits the same radix cache; :meth:`SGLangClient.release_session`
  forgets the assignment.
* **Retries** (tenacity, exponential backoff with jitter, ``max_retries`` after the first attempt):
  a connection that could not be opened is always retried (the server never saw the request); read
  errors, timeouts, 5xx answers and malformed JSON are retried only for idempotent calls (every call
  except the collective ones of distributed weight sync, which would deadlock if sent twice). 4xx
  answers are never retried and raise :class:`SGLangRequestError` with the server's message.
* **Dead servers.** Before every attempt and after the last one, a launched server's process is
  checked: if it has exited, :class:`~megatron_guided.rollout.sglang.server.SGLangServerError` names
  it with its exit code and log tail instead of retrying on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from megatron_guided.rollout.sglang.server import SGLangServer

__all__ = ["SGLangClient", "SGLangRequestError", "SGLangUnavailableError"]


class SGLangRequestError(RuntimeError):
    """The server rejected a request (4xx, or an update that reported ``success: false``)."""


class SGLangUnavailableError(RuntimeError):
    """A server could not be reached or kept failing after the retries."""


class _Retryable(Exception):
    """A failed attempt that may be retried; ``safe`` when the server never received the request."""

    def __init__(self, message: str, *, safe: bool) -> None:
        super().__init__(message)
        self.safe = safe


@dataclass(eq=False)
class _Replica:
    server: SGLangServer
    inflight: int = 0


class SGLangClient:
    """Async calls to one or more SGLang servers (create and use it on one event loop).

    Args:
        servers: the replicas (launched or attached).
        timeout_s: seconds per HTTP request (a whole generation).
        max_retries: retries after the first attempt.
        retry_interval_s: base of the exponential backoff.
    """

    def __init__(self, servers: Sequence[SGLangServer], *, timeout_s: float = 600.0, max_retries: int = 3,
                 retry_interval_s: float = 0.5) -> None:
        if not servers:
            raise ValueError("SGLangClient needs at least one server")
        self.replicas = [_Replica(server) for server in servers]
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_interval_s = retry_interval_s
        self._sessions: dict[str, _Replica] = {}
        self._http: httpx.AsyncClient | None = None
        self.num_retries = 0
        """Retry attempts made so far."""

    # -- routing ----------------------------------------------------------------------------------------
    def route(self, session_id: str | None) -> _Replica:
        """The replica for a request: the session's own, else the least busy (first on ties)."""
        if session_id is not None and session_id in self._sessions:
            return self._sessions[session_id]
        replica = min(self.replicas, key=lambda r: r.inflight)
        if session_id is not None:
            self._sessions[session_id] = replica
        return replica

    def release_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    # -- calls ------------------------------------------------------------------------------------------
    async def generate(self, payload: dict[str, Any], *, session_id: str | None = None) -> Any:
        """``POST /generate`` on the routed replica; the parsed JSON answer."""
        replica = self.route(session_id)
        replica.inflight += 1
        try:
            return await self.call(replica, "/generate", payload)
        finally:
            replica.inflight -= 1

    async def call_all(self, path: str, body: Any = None, *, method: str = "POST", idempotent: bool = True,
                       expect_json: bool = True) -> list[Any]:
        """The same call on every replica, concurrently; answers in replica order."""
        return list(await asyncio.gather(*(
            self.call(r, path, body, method=method, idempotent=idempotent, expect_json=expect_json)
            for r in self.replicas)))

    async def call(self, replica: _Replica, path: str, body: Any = None, *, method: str = "POST",
                   idempotent: bool = True, expect_json: bool = True) -> Any:
        """One call with retries (see the module doc); JSON (or text with ``expect_json=False``)."""
        server = replica.server

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, _Retryable) and (exc.safe or idempotent)

        try:
            async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.max_retries + 1), retry=retry_if_exception(retryable),
                    wait=wait_exponential_jitter(multiplier=self.retry_interval_s, max=30.0,
                                                 jitter=self.retry_interval_s),
                    before_sleep=self._count_retry, reraise=True):
                with attempt:
                    server.check_alive()
                    return await self._attempt(server, method, path, body, expect_json)
        except _Retryable as exc:
            server.check_alive()  # a dead server is the better explanation
            tries = attempt.retry_state.attempt_number
            raise SGLangUnavailableError(f"{method} {server.url}{path} failed after {tries} attempt(s): {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _count_retry(self, _state) -> None:
        self.num_retries += 1

    async def _attempt(self, server: SGLangServer, method: str, path: str, body: Any, expect_json: bool) -> Any:
        http = self._client()
        try:
            response = await http.request(method, f"{server.url}{path}", json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}", safe=True) from exc
        except httpx.TransportError as exc:  # sent, but no (complete) answer: read errors, timeouts
            raise _Retryable(f"{type(exc).__name__}: {exc or 'no answer'}", safe=False) from exc
        if response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}: {response.text[:500]}", safe=False)
        if response.status_code >= 400:
            raise SGLangRequestError(f"{method} {server.url}{path} rejected (HTTP {response.status_code}): "
                                     f"{response.text[:1000]}")
        if not expect_json:
            return response.text
        try:
            return response.json()
        except json.JSONDecodeError as exc:
            raise _Retryable(f"malformed JSON from {path}: {exc}; body starts {response.text[:200]!r}",
                             safe=False) from exc

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)),
                limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256), trust_env=False)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
