"""The HTTP verifier: an LLM behind any OpenAI-style ``/chat/completions`` endpoint (vLLM, SGLang,
TGI, llama.cpp, a hosted API, ...).

Request
    ``POST {base_url}/chat/completions`` with ``{"model", "messages", "max_tokens", "temperature",
    "top_p"}``; ``messages`` come from :func:`~megatron_guided.verifier.prompt.build_verifier_messages`.
    ``top_k`` is sent **only when it is > 0**: the strict OpenAI API rejects the field, and -1 (the
    config default) / 0 mean "disabled" anyway, so a default config works against any server while
    vLLM / SGLang users can still set it. ``Authorization: Bearer <key>`` is sent only when a key is
    configured.

Failure policy (the original silently turned every failure into STOP; we never do)
    * **Retried** (up to ``max_retries`` retries after the first attempt): timeouts (``timeout`` is a
      deadline for the whole attempt, excluding the wait for a concurrency slot), connection errors
      (refused, reset, dropped before/while answering: httpx ``NetworkError`` / ``RemoteProtocolError``
      / ``ProxyError``), HTTP 429 and 5xx, and a 2xx whose body is not JSON or has no
      ``choices[0].message.content`` / ``choices[0].text`` field at all (a broken or overloaded proxy
      in front of the model, treated as a transient server fault).
    * **Not retried**: any other status (401/403/404/400/... and 3xx: the request or the setup is
      wrong, so repeating it cannot help), invalid URLs and other local errors, and a well-formed reply
      whose content is empty or ``null`` (e.g. a reasoning model that spent ``max_tokens`` inside its
      reasoning: the model answered, retrying the same request rarely changes that).
    * Backoff before retry ``k`` (k = 0, 1, ...): full jitter, ``uniform(0, min(retry_max_interval,
      retry_interval * 2**k))``. A ``Retry-After`` header (seconds or an HTTP date) on a retried
      response wins, capped at ``retry_max_interval``.
    * When retries are exhausted, or the error is not retryable, :meth:`HttpVerifier.verify` returns a
      :class:`VerdictKind.FAILED` reply whose ``error`` names the cause and the number of attempts. It
      never raises for transport/HTTP problems and never returns STOP for a failure; the caller
      applies ``worker.rollout.verifier.on_failure``. (Cancellation still propagates.)

Parsing
    ``choices[0].message.content`` (a string, or a list of ``{"type": "text", "text": ...}`` parts),
    else ``choices[0].text``. ``message.reasoning_content`` / ``message.reasoning`` is the verifier's
    reasoning and is ignored for the verdict; inline ``<think>...</think>`` is removed by
    :func:`~megatron_guided.verifier.base.parse_verifier_text`, which decides GUIDE / STOP / FAILED.

Concurrency
    An ``asyncio.Semaphore(concurrency)`` bounds the requests in flight (the connection pool has the
    same size). A slot is held for one attempt, not during backoff sleeps, so one failing request does
    not starve the others. The client and semaphore are bound to the running event loop; when called
    from a new loop (e.g. one ``asyncio.run`` per rollout step) they are rebuilt.

Secrets
    The API key is held in a :class:`_Secret` (its ``repr`` is ``'***'``), attached per request (never
    to the client's default headers) and scrubbed by :func:`_redact` from every error text and log line
    this module writes, together with any ``Bearer ...`` token, URL user-info and ``…key=``/``…token=``
    (also ``"api_key": "…"``) values. Keep keys out of ``base_url``: httpx logs request URLs at INFO.

Metrics: ``calls``, ``failures`` (FAILED replies), ``retries`` (retry attempts),
``total_latency_s`` (sum of :attr:`VerifierReply.latency_s`); :meth:`HttpVerifier.stats` returns them.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from megatron_guided.data.images import EncodedImages
from megatron_guided.verifier.base import (
    DEFAULT_STOP_TOKEN,
    VerdictKind,
    VerifierReply,
    VerifierRequest,
    parse_verifier_text,
)
from megatron_guided.verifier.prompt import build_verifier_messages, load_system_prompt

if TYPE_CHECKING:
    from megatron_guided.config import VerifierConfig

__all__ = ["HttpVerifier", "resolve_api_key"]

log = logging.getLogger(__name__)

_ERROR_BODY_CHARS = 300
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s,;'\"]+")
_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@")
_SECRET_FIELD = re.compile(r"(?i)(\b[a-z_-]*(?:key|token|secret|password)[\"']?\s*[=:]\s*[\"']?)[^&\s'\",;}]+")


class _Secret:
    """A string that does not show itself in repr/str (so it stays out of dumps and tracebacks)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self):  # pickling would write the key in clear
        raise TypeError("an API key is not picklable; build the verifier where it is used")


def _redact(text: str, secret: str | _Secret | None = None) -> str:
    """`text` with the secret (if any), Bearer tokens, URL user-info and key/token/secret/password values masked."""
    value = secret.reveal() if isinstance(secret, _Secret) else secret
    if value:
        text = text.replace(value, "***")
    text = _BEARER.sub(r"\1***", text)
    text = _USERINFO.sub(r"\1***@", text)
    return _SECRET_FIELD.sub(r"\1***", text)


def resolve_api_key(cfg: VerifierConfig) -> str | None:
    """``cfg.api_key``, else the env var named by ``cfg.api_key_env``, else the (stripped) contents of
    ``cfg.api_key_file``; None when none is set. A named key file that does not exist is an error."""
    if cfg.api_key:
        return cfg.api_key
    if cfg.api_key_env and os.environ.get(cfg.api_key_env):
        return os.environ[cfg.api_key_env].strip()
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"worker.rollout.verifier.api_key_file={cfg.api_key_file}: no such file")
        return path.read_text().strip() or None
    return None


def _retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


@dataclass(slots=True)
class _Attempt:
    """The outcome of one HTTP attempt."""

    text: str | None = None
    """The reply content (success); None when the attempt failed."""
    error: str = ""
    retryable: bool = False
    retry_after: float | None = None


def _extract_content(data: Any) -> tuple[str | None, bool]:
    """(content, well_formed) from an OpenAI chat-completions body. Content may be "" (empty reply);
    well_formed is False when the body has no usable choices[0].message.content / choices[0].text."""
    if not isinstance(data, dict):
        return None, False
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None, False
    choice = choices[0]
    message = choice.get("message")
    has_field = False
    if isinstance(message, dict) and "content" in message:
        has_field = True
        content = message["content"]
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if isinstance(content, str) and content.strip():
            return content, True
        if content is not None and not isinstance(content, str):
            return None, False
    if "text" in choice:
        has_field = True
        if isinstance(choice["text"], str) and choice["text"].strip():
            return choice["text"], True
        if choice["text"] is not None and not isinstance(choice["text"], str):
            return None, False
    return ("", True) if has_field else (None, False)


class HttpVerifier:
    """:class:`~megatron_guided.verifier.base.Verifier` over an OpenAI-style chat-completions endpoint.

    See the module docstring for the request, retry/failure policy and secret handling.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "verifier",
        api_key: str | None = None,
        system_prompt: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 3,
        retry_interval: float = 1.0,
        retry_max_interval: float = 30.0,
        concurrency: int = 16,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = -1,
        max_tokens: int = 256,
        stop_token: str = DEFAULT_STOP_TOKEN,
        multimodal: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not base_url:
            raise ValueError("HttpVerifier needs a base_url (requests go to POST {base_url}/chat/completions)")
        if timeout <= 0:
            raise ValueError(f"timeout={timeout} must be > 0")
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries} must be >= 0")
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} must be >= 1")
        if retry_interval < 0 or retry_max_interval < 0:
            raise ValueError("retry_interval and retry_max_interval must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self._api_key = _Secret(api_key) if api_key else None
        self.stop_token = stop_token
        self.system_prompt = system_prompt if system_prompt is not None else load_system_prompt(
            None, stop_token=stop_token)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.retry_interval = float(retry_interval)
        self.retry_max_interval = float(retry_max_interval)
        self.concurrency = int(concurrency)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.max_tokens = int(max_tokens)
        self.multimodal = multimodal
        self._encoded_images = EncodedImages()  # each image encoded once over a dialogue's verifier calls
        self._transport = transport
        self._rng = rng or random.Random()
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # metrics
        self.calls = 0
        self.failures = 0
        self.retries = 0
        self.total_latency_s = 0.0

    @classmethod
    def from_config(cls, cfg: VerifierConfig, *, api_key: str | None = None, **overrides: Any) -> HttpVerifier:
        """Build from ``worker.rollout.verifier``; the key is `api_key`, else :func:`resolve_api_key`.
        `overrides` (e.g. ``transport=``, ``rng=``, ``system_prompt=``) go to the constructor."""
        kwargs: dict[str, Any] = dict(
            model=cfg.model,
            api_key=api_key if api_key else resolve_api_key(cfg),
            timeout=cfg.http_timeout,
            max_retries=cfg.http_max_retries,
            retry_interval=cfg.http_retry_interval,
            retry_max_interval=cfg.http_retry_max_interval,
            concurrency=cfg.http_concurrency,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_tokens=cfg.max_tokens,
            stop_token=cfg.stop_token,
            multimodal=cfg.multimodal,
        )
        if "system_prompt" not in overrides:
            kwargs["system_prompt"] = load_system_prompt(cfg.prompt_template, stop_token=cfg.stop_token)
        kwargs.update(overrides)
        return cls(cfg.base_url, **kwargs)

    # ------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"HttpVerifier(url={_redact(self.url, self._api_key)!r}, model={self.model!r}, "
                f"api_key={'***' if self._api_key else None}, timeout={self.timeout}, "
                f"max_retries={self.max_retries}, concurrency={self.concurrency})")

    __str__ = __repr__

    def __getstate__(self):
        raise TypeError("HttpVerifier is not picklable (it holds a client and possibly an API key); "
                        "build it with HttpVerifier.from_config where it is used")

    def stats(self) -> dict[str, float]:
        return {"calls": self.calls, "failures": self.failures, "retries": self.retries,
                "total_latency_s": self.total_latency_s}

    def request_body(self, request: VerifierRequest) -> dict[str, Any]:
        """The JSON body sent for `request`; with ``multimodal`` each image part becomes an OpenAI
        ``image_url`` part holding the image as a base64 PNG data URL (encoded once per image object)."""
        messages = build_verifier_messages(request, system_prompt=self.system_prompt, multimodal=self.multimodal)
        images = iter(request.images)  # encoded only where an image part asks for one (multimodal)
        for message in messages:
            if isinstance(message["content"], list):
                message["content"] = [
                    {"type": "image_url", "image_url": {"url": self._encoded_images.url(next(images))}}
                    if part["type"] == "image" else part for part in message["content"]]
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if self.top_k > 0:  # strict OpenAI servers reject top_k; <= 0 means "disabled" anyway
            body["top_k"] = self.top_k
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key.reveal()}"
        return headers

    def _redact(self, text: str) -> str:
        return _redact(text, self._api_key)

    def _ensure_client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # A client from a finished loop cannot be closed from this one; its sockets died with it.
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
                transport=self._transport,
                follow_redirects=False,
            )
            self._semaphore = asyncio.Semaphore(self.concurrency)
            self._loop = loop
        assert self._semaphore is not None
        return self._client, self._semaphore

    def _backoff(self, retry_index: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.retry_max_interval, retry_after)
        cap = min(self.retry_max_interval, self.retry_interval * (2 ** retry_index))
        return self._rng.uniform(0.0, cap)

    # ------------------------------------------------------------------------------------------------
    async def verify(self, request: VerifierRequest) -> VerifierReply:
        start = time.monotonic()
        self.calls += 1
        body = self.request_body(request)
        attempts = 0
        while True:
            attempt = await self._attempt(body)
            attempts += 1
            if attempt.text is not None:
                reply = (parse_verifier_text(attempt.text, stop_token=self.stop_token) if attempt.text
                         else VerifierReply(kind=VerdictKind.FAILED, error="verifier returned empty content"))
                break
            if not attempt.retryable or attempts > self.max_retries:
                tried = f"after {attempts} attempt{'s' if attempts > 1 else ''}"
                reply = VerifierReply(kind=VerdictKind.FAILED,
                                      error=self._redact(f"HTTP verifier failed {tried}: {attempt.error}"))
                break
            delay = self._backoff(attempts - 1, attempt.retry_after)
            self.retries += 1
            log.debug("verifier request %s failed (attempt %d/%d): %s; retrying in %.2fs",
                      request.sample_id or "-", attempts, self.max_retries + 1, attempt.error, delay)
            await asyncio.sleep(delay)
        reply.latency_s = time.monotonic() - start
        self.total_latency_s += reply.latency_s
        if reply.kind is VerdictKind.FAILED:
            self.failures += 1
            log.warning("verifier request %s: FAILED (%s)", request.sample_id or "-", reply.error)
        return reply

    async def _attempt(self, body: dict[str, Any]) -> _Attempt:
        client, semaphore = self._ensure_client()
        async with semaphore:
            try:
                async with asyncio.timeout(self.timeout):
                    response = await client.post(self.url, json=body, headers=self._headers())
            except (TimeoutError, httpx.TimeoutException) as exc:
                return _Attempt(error=f"timeout after {self.timeout:g}s ({type(exc).__name__})", retryable=True)
            except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
                return _Attempt(error=self._redact(f"connection error ({type(exc).__name__}: {exc})"),
                                retryable=True)
            except httpx.HTTPError as exc:  # invalid URL, unsupported protocol, local protocol error, ...
                return _Attempt(error=self._redact(f"request error ({type(exc).__name__}: {exc})"))
        status = response.status_code
        if status == 429 or status >= 500:
            return _Attempt(error=self._status_error(response), retryable=True,
                            retry_after=_retry_after_seconds(response.headers.get("retry-after")))
        if not 200 <= status < 300:
            return _Attempt(error=self._status_error(response))
        try:
            data = response.json()
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            return _Attempt(error=self._redact(f"HTTP {status} with a body that is not JSON: "
                                               f"{response.text[:_ERROR_BODY_CHARS]!r}"), retryable=True)
        content, well_formed = _extract_content(data)
        if not well_formed:
            return _Attempt(error=self._redact(f"HTTP {status} without choices[0].message.content or "
                                               f"choices[0].text: {response.text[:_ERROR_BODY_CHARS]!r}"),
                            retryable=True)
        return _Attempt(text=content)

    def _status_error(self, response: httpx.Response) -> str:
        try:
            text = response.text
        except Exception:  # undecodable body
            text = ""
        snippet = " ".join(text.split())[:_ERROR_BODY_CHARS]
        return self._redact(f"HTTP {response.status_code} {response.reason_phrase}: {snippet!r}")

    async def aclose(self) -> None:
        client, self._client, self._semaphore = self._client, None, None
        if client is not None:
            try:
                if self._loop is asyncio.get_running_loop():
                    await client.aclose()
            finally:
                self._loop = None

    async def __aenter__(self) -> HttpVerifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
