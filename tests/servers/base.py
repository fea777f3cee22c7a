"""A threaded stdlib HTTP/1.1 server on 127.0.0.1:<ephemeral port>, started/stopped from a test."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased header names."""
    raw_body: bytes
    body: Any = None
    """Parsed JSON body, or None when it was not JSON."""
    received_at: float = field(default_factory=time.monotonic)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real inference servers
    server: _Server

    def do_POST(self) -> None:  # noqa: N802
        self.server.app._dispatch(self)

    def do_GET(self) -> None:  # noqa: N802
        self.server.app._dispatch(self)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError, OSError):
            pass  # the client went away (timeouts, dropped connections): expected in fault tests

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: BackgroundHTTPServer

    def handle_error(self, request, client_address) -> None:  # no tracebacks on stderr for resets
        pass


class BackgroundHTTPServer:
    """Base class: subclasses implement :meth:`handle` (request already read and recorded).

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``url`` is ``http://127.0.0.1:<port>/v1``.
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.stopping = threading.Event()
        """Set by stop(): anything sleeping/hanging in a handler should wake up and return."""
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle -------------------------------------------------------------------------------------
    def start(self) -> BackgroundHTTPServer:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.app = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{type(self).__name__}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> BackgroundHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # request plumbing -----------------------------------------------------------------------------
    def _dispatch(self, h: _Handler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rec = RecordedRequest(method=h.command, path=h.path, raw_body=raw, body=body,
                              headers={k.lower(): v for k, v in h.headers.items()})
        with self._lock:
            self.requests.append(rec)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.handle(h, rec)
        finally:
            with self._lock:
                self.in_flight -= 1

    def handle(self, h: _Handler, rec: RecordedRequest) -> None:
        raise NotImplementedError

    # response helpers -----------------------------------------------------------------------------
    @staticmethod
    def send(h: _Handler, status: int, body: bytes | str | dict, headers: dict[str, str] | None = None) -> None:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            content_type = "application/json"
        else:
            body = body.encode() if isinstance(body, str) else body
            content_type = "text/plain; charset=utf-8"
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()

    @staticmethod
    def completion_body(text: str | None, *, model: str = "verifier", finish_reason: str = "stop",
                        prompt_tokens: int = 0, completion_tokens: int = 0,
                        message_extra: dict[str, Any] | None = None, as_text: bool = False) -> dict[str, Any]:
        """An OpenAI chat.completion JSON body (``as_text``: legacy ``choices[0].text`` only)."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if as_text:
            choice["text"] = text
        else:
            choice["message"] = {"role": "assistant", "content": text, **(message_extra or {})}
        return {
            "id": f"chatcmpl-{time.monotonic_ns():x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
