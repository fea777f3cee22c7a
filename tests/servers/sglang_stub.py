"""A stand-in for an SGLang 0.5.23 server's native HTTP API, for what a real server cannot do here.

Used only for (a) the GPU-only paths (``/update_weights_from_tensor``, ``/init_weights_update_group`` +
``/update_weights_from_distributed``, ``/release_memory_occupation``), checked at the exact-protocol
level, and (b) fault injection (5xx, malformed JSON, dropped connections) and multi-replica routing,
which a single real CPU server cannot show. Response bodies follow the recorded fixtures in
``tests/fixtures/sglang-0.5.23``; everything else runs against a real server in
``tests/integration/test_sglang_*.py``.

Every request is recorded. ``faults`` is a queue of actions applied to the next requests of a path:
``("status", code)``, ``("bad_json",)`` or ``("drop",)`` (close the connection without an answer).
"""

from __future__ import annotations

import collections
import copy
import json
import socket
import threading
from pathlib import Path
from typing import Any

from tests.servers.base import BackgroundHTTPServer, RecordedRequest, _Handler

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sglang-0.5.23"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"sglang_0.5.23_{name}.json").read_text())


class SGLangStub(BackgroundHTTPServer):
    """``base_url`` is ``http://127.0.0.1:<port>`` (no ``/v1``: the native API)."""

    def __init__(self, *, name: str = "stub") -> None:
        super().__init__()
        self.name = name
        self.weight_version = "default"
        self.faults: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.on_request: dict[str, Any] = {}
        """path -> callable(body) run before answering (e.g. join a process group)."""
        self._state_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def bodies(self, path: str) -> list[Any]:
        return [r.body for r in self.requests if r.path == path]

    def handle(self, h: _Handler, rec: RecordedRequest) -> None:
        path = rec.path.split("?")[0]
        with self._state_lock:
            fault = self.faults[path].popleft() if self.faults[path] else None
        if fault is not None:
            self._fault(h, fault)
            return
        if path in self.on_request:
            self.on_request[path](rec.body)
        if path == "/health":
            self.send(h, 200, "")
        elif path == "/model_info":
            self.send(h, 200, fixture("model_info")["response"] | {"weight_version": self.weight_version})
        elif path == "/generate":
            self.send(h, 200, self._generate(rec.body))
        elif path == "/flush_cache":
            self.send(h, 200, fixture("flush_cache")["response"])
        elif path in ("/pause_generation", "/continue_generation"):
            verb = "paused" if path == "/pause_generation" else "continued"
            self.send(h, 200, {"message": f"Generation {verb} successfully.", "status": "ok"})
        elif path in ("/update_weights_from_disk", "/update_weights_from_tensor", "/update_weights_from_distributed"):
            if rec.body.get("weight_version") is not None:
                self.weight_version = rec.body["weight_version"]
            answer = {"success": True, "message": "Succeeded to update model weights."}
            self.send(h, 200, answer | ({"num_paused_requests": 0} if path.endswith("disk") else {}))
        elif path in ("/init_weights_update_group", "/release_memory_occupation", "/resume_memory_occupation"):
            self.send(h, 200, {"success": True, "message": "ok"})
        else:
            self.send(h, 404, {"detail": "Not Found"})

    def _generate(self, body: dict[str, Any]) -> dict[str, Any]:
        """The recorded single-prompt answer, with as many tokens as max_new_tokens asks (ids 7, 8, ...)."""
        answer = copy.deepcopy(fixture("generate_input_ids_logprobs")["response"])
        n = body["sampling_params"]["max_new_tokens"]
        ids = [7 + i for i in range(n)]
        answer["output_ids"] = ids
        meta = answer["meta_info"]
        meta["output_token_logprobs"] = [[-0.5 - i / 10, t, None] for i, t in enumerate(ids)]
        meta["finish_reason"] = {"type": "length", "length": n}
        meta["prompt_tokens"] = len(body["input_ids"])
        meta["weight_version"] = self.weight_version
        meta["id"] = self.name
        return answer

    def _fault(self, h: _Handler, fault: tuple) -> None:
        if fault[0] == "status":
            self.send(h, fault[1], {"error": {"message": f"injected {fault[1]}"}})
        elif fault[0] == "bad_json":
            self.send(h, 200, b'{"output_ids": [1, 2')
        elif fault[0] == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        else:
            raise ValueError(fault)
