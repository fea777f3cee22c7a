"""SGLangClient against local stub servers: retries where safe, clear errors, sticky routing, dead servers.

The stubs (tests/servers/sglang_stub.py) answer in the recorded SGLang 0.5.23 format; what a real server
does is checked in tests/integration/test_sglang_engine.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from megatron_guided.rollout.sglang.client import SGLangClient, SGLangRequestError, SGLangUnavailableError
from megatron_guided.rollout.sglang.server import SGLangServer, SGLangServerError
from megatron_guided.utils.net import free_port
from tests.servers.sglang_stub import SGLangStub

PAYLOAD = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}, "return_logprob": True}


@pytest.fixture
def stubs():
    a, b = SGLangStub(name="a").start(), SGLangStub(name="b").start()
    yield a, b
    a.stop()
    b.stop()


def client_for(*stubs: SGLangStub, **kwargs) -> SGLangClient:
    kwargs = {"max_retries": 2, "retry_interval_s": 0.01} | kwargs
    return SGLangClient([SGLangServer(url=s.base_url) for s in stubs], **kwargs)


async def _use(client: SGLangClient, coro):
    try:
        return await coro
    finally:
        await client.aclose()


@pytest.mark.parametrize("fault", [("status", 503), ("bad_json",), ("drop",)])
def test_idempotent_calls_are_retried(stubs, fault):
    stub = stubs[0]
    stub.faults["/generate"].extend([fault, fault])
    client = client_for(stub)
    answer = asyncio.run(_use(client, client.generate(PAYLOAD)))
    assert answer["output_ids"] == [7, 8]
    assert stub.paths().count("/generate") == 3 and client.num_retries == 2


def test_retries_are_bounded_and_the_error_says_what_failed(stubs):
    stub = stubs[0]
    stub.faults["/generate"].extend([("status", 500)] * 5)
    client = client_for(stub)
    with pytest.raises(SGLangUnavailableError, match=r"POST http://127.0.0.1:\d+/generate failed after 3 attempt"):
        asyncio.run(_use(client, client.generate(PAYLOAD)))
    assert stub.paths().count("/generate") == 3


def test_collective_calls_are_not_resent_after_the_server_got_them(stubs):
    """A distributed weight update that reached the server must not be sent twice (it would deadlock)."""
    stub = stubs[0]
    stub.faults["/update_weights_from_distributed"].append(("drop",))
    client = client_for(stub)
    with pytest.raises(SGLangUnavailableError, match="after 1 attempt"):
        asyncio.run(_use(client, client.call(client.replicas[0], "/update_weights_from_distributed", {},
                                             idempotent=False)))
    assert stub.paths().count("/update_weights_from_distributed") == 1


def test_client_errors_are_not_retried(stubs):
    stub = stubs[0]
    stub.faults["/generate"].append(("status", 400))
    client = client_for(stub)
    with pytest.raises(SGLangRequestError, match="rejected \\(HTTP 400\\).*injected 400"):
        asyncio.run(_use(client, client.generate(PAYLOAD)))
    assert stub.paths().count("/generate") == 1


def test_connection_refused_is_retried_then_reported():
    url = f"http://127.0.0.1:{free_port()}"
    client = SGLangClient([SGLangServer(url=url)], max_retries=2, retry_interval_s=0.01)
    start = time.monotonic()
    with pytest.raises(SGLangUnavailableError, match=f"{url}/generate failed after 3 attempt.*ConnectError"):
        asyncio.run(_use(client, client.generate(PAYLOAD)))
    assert time.monotonic() - start < 5


def test_a_dead_launched_server_is_reported_with_its_log_not_retried(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("Traceback ...\nRuntimeError: scheduler crashed\n")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    server = SGLangServer(url=f"http://127.0.0.1:{free_port()}", process=process, log_path=log)
    client = SGLangClient([server], max_retries=5, retry_interval_s=1.0)
    start = time.monotonic()
    with pytest.raises(SGLangServerError, match=r"(?s)exited with code 3; last lines of .*scheduler crashed"):
        asyncio.run(_use(client, client.generate(PAYLOAD)))
    assert time.monotonic() - start < 1.0  # no backoff spent on a dead server


def test_sessions_stick_to_one_replica_and_load_is_balanced(stubs):
    """Every turn of a session goes to the replica of its first turn (its radix cache); sessions and
    session-less requests spread over both replicas."""
    client = client_for(*stubs)

    async def dialogue(session: str) -> list[str]:
        return [(await client.generate(PAYLOAD, session_id=session))["meta_info"]["id"] for _ in range(3)]

    async def run():
        routes = await asyncio.gather(*(dialogue(f"s{i}") for i in range(6)))
        loose = await asyncio.gather(*(client.generate(PAYLOAD) for _ in range(8)))
        return routes, [a["meta_info"]["id"] for a in loose]

    routes, loose = asyncio.run(_use(client, run()))
    assert all(len(set(r)) == 1 for r in routes), routes
    assert {r[0] for r in routes} == {"a", "b"}
    assert set(loose) == {"a", "b"}
    client.release_session("s0")
    assert "s0" not in client._sessions
