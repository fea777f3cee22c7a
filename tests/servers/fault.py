"""An OpenAI-style endpoint with scripted faults: each request pops the next :class:`Action` from a queue
(``default`` when the queue is empty) and every request is recorded (headers, JSON body, arrival time)."""

from __future__ import annotations

import collections
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from tests.servers.base import BackgroundHTTPServer, RecordedRequest, _Handler


@dataclass(frozen=True)
class Action:
    kind: str
    text: str | None = None
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    message_extra: dict[str, Any] = field(default_factory=dict)
    as_text: bool = False

    # constructors ---------------------------------------------------------------------------------
    @classmethod
    def reply(cls, text: str | None, *, delay: float = 0.0, as_text: bool = False,
              **message_extra: Any) -> Action:
        """200 with an OpenAI body whose choices[0].message.content is `text` (or choices[0].text)."""
        return cls("reply", text=text, delay=delay, as_text=as_text, message_extra=message_extra)

    @classmethod
    def error(cls, status: int, body: str = "", *, headers: dict[str, str] | None = None) -> Action:
        return cls("status", status=status, body=(body or f'{{"error": "status {status}"}}').encode(),
                   headers=dict(headers or {}))

    @classmethod
    def echo_auth(cls, status: int = 401) -> Action:
        """`status` whose body echoes the Authorization header it got (a careless server)."""
        return cls("echo_auth", status=status)

    @classmethod
    def raw(cls, body: bytes, status: int = 200) -> Action:
        return cls("status", status=status, body=body)

    @classmethod
    def malformed(cls) -> Action:
        return cls.raw(b'{"choices": [{"message": {"content": "Step 2 is wr')

    @classmethod
    def no_choices(cls) -> Action:
        return cls.raw(b'{"object": "chat.completion", "choices": []}')

    @classmethod
    def empty(cls) -> Action:
        return cls.reply("")

    @classmethod
    def hang(cls, seconds: float = 10.0) -> Action:
        """Say nothing for `seconds` (or until the server stops), then answer normally."""
        return cls("reply", text="late reply", delay=seconds)

    @classmethod
    def drop(cls) -> Action:
        """Close the connection without sending anything."""
        return cls("drop")

    @classmethod
    def truncate(cls) -> Action:
        """Send headers announcing a body, part of it, then close the connection."""
        return cls("truncate")


class FaultServer(BackgroundHTTPServer):
    def __init__(self, default: Action | None = None) -> None:
        super().__init__()
        self.default = default or Action.reply("Step 1 is fine; now add the tens.")
        self._actions: collections.deque[Action] = collections.deque()
        self._actions_lock = threading.Lock()

    def push(self, *actions: Action) -> FaultServer:
        with self._actions_lock:
            self._actions.extend(actions)
        return self

    @property
    def attempts(self) -> int:
        return len(self.requests)

    def _next(self) -> Action:
        with self._actions_lock:
            return self._actions.popleft() if self._actions else self.default

    def handle(self, h: _Handler, rec: RecordedRequest) -> None:
        action = self._next()
        if action.delay:
            self.stopping.wait(action.delay)
        if action.kind == "reply":
            self.send(h, 200, self.completion_body(action.text, message_extra=action.message_extra,
                                                   as_text=action.as_text))
        elif action.kind == "status":
            self.send(h, action.status, action.body or b"", action.headers)
        elif action.kind == "echo_auth":
            self.send(h, action.status, f"bad credentials: {rec.headers.get('authorization', '')}")
        elif action.kind == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        elif action.kind == "truncate":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "500")
            h.end_headers()
            h.wfile.write(b'{"choices": [{"message": {"content": "Step')
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        else:
            raise ValueError(f"unknown action {action.kind!r}")
