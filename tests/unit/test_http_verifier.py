"""HttpVerifier against real local HTTP servers: a scripted fault-injecting OpenAI-style endpoint and a tiny
transformers model behind /v1/chat/completions. Every test is bounded in time (small client timeouts and
backoff intervals, and an asyncio.wait_for around each scenario)."""

from __future__ import annotations

import asyncio
import logging
import pickle
import random
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest
import torch

from megatron_guided.utils.net import free_port
from megatron_guided.config import Config, VerifierConfig, save_resolved
from megatron_guided.verifier.base import Turn, VerdictKind, Verifier, VerifierRequest
from megatron_guided.verifier.http import HttpVerifier, _redact, _retry_after_seconds, resolve_api_key
from megatron_guided.verifier.prompt import build_verifier_messages, load_system_prompt
from tests.servers import Action, FaultServer, TinyOpenAIServer, build_tiny_verifier_model

SECRET = "sk-test-9f8e7d6c5b4a-do-not-leak"
GUIDE_TEXT = "Step 2 is wrong.\n[SCORE] hallucination_detect=1"
SCENARIO_LIMIT_S = 10.0

REQUEST = VerifierRequest(
    problem="Compute 41 + 9.",
    dialogue=[Turn(role="policy", content="Step 1: 41 + 9 = 51.")],
    reference_answer="50",
    sample_id="s0",
)


def run(coro, limit: float = SCENARIO_LIMIT_S):
    """Run a scenario in a fresh event loop; no scenario may take longer than `limit`."""
    return asyncio.run(asyncio.wait_for(coro, limit))


def make(url: str, **kw) -> HttpVerifier:
    defaults = dict(timeout=0.5, max_retries=2, retry_interval=0.01, retry_max_interval=0.05, concurrency=4,
                    rng=random.Random(0))
    return HttpVerifier(url, **{**defaults, **kw})


async def verify_once(verifier: HttpVerifier, request: VerifierRequest = REQUEST):
    try:
        return await verifier.verify(request)
    finally:
        await verifier.aclose()


@pytest.fixture
def server():
    with FaultServer() as s:
        yield s


# --------------------------------------------------------------------------------------------------------
# request shape and parsing
# --------------------------------------------------------------------------------------------------------
def test_guide_reply_and_request_shape(server):
    server.push(Action.reply(GUIDE_TEXT))
    v = make(server.url, model="my-verifier", temperature=0.3, top_p=0.9, max_tokens=77)
    assert isinstance(v, Verifier)
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.GUIDE
    assert reply.guidance == "Step 2 is wrong."
    assert reply.hallucination_flags == [1]
    assert reply.error is None and reply.latency_s > 0
    assert server.attempts == 1
    rec = server.requests[0]
    assert rec.method == "POST" and rec.path == "/v1/chat/completions"
    assert "authorization" not in rec.headers  # no key configured: no header at all
    assert set(rec.body) == {"model", "messages", "max_tokens", "temperature", "top_p"}  # top_k=-1: not sent
    assert rec.body["model"] == "my-verifier" and rec.body["max_tokens"] == 77
    assert rec.body["temperature"] == 0.3 and rec.body["top_p"] == 0.9
    assert rec.body["messages"] == build_verifier_messages(REQUEST, system_prompt=load_system_prompt(None))
    assert v.stats() == {"calls": 1, "failures": 0, "retries": 0, "total_latency_s": reply.latency_s}


def test_top_k_sent_only_when_enabled(server):
    run(verify_once(make(server.url, top_k=20)))
    run(verify_once(make(server.url, top_k=0)))
    assert server.requests[0].body["top_k"] == 20
    assert "top_k" not in server.requests[1].body


def test_base_url_trailing_slash(server):
    run(verify_once(make(server.url + "/")))
    assert server.requests[0].path == "/v1/chat/completions"


@pytest.mark.parametrize("action, kind, flags, guidance", [
    (Action.reply("###STOP###\n[SCORE] hallucination_detect=0"), VerdictKind.STOP, [0], ""),
    (Action.reply(GUIDE_TEXT, as_text=True), VerdictKind.GUIDE, [1], "Step 2 is wrong."),  # choices[0].text
    # reasoning_content is reasoning, not the verdict
    (Action.reply("###STOP###", reasoning_content="Step 2 is wrong, 41+9=50"), VerdictKind.STOP, [], ""),
    (Action.reply("<think>maybe ###STOP###?</think>Step 3 is wrong."), VerdictKind.GUIDE, [], "Step 3 is wrong."),
    (Action.reply([{"type": "text", "text": "Recheck step 1."}]), VerdictKind.GUIDE, [], "Recheck step 1."),
], ids=["stop", "text-fallback", "reasoning-content-ignored", "think-tags", "content-parts"])
def test_reply_parsing(server, action, kind, flags, guidance):
    server.push(action)
    reply = run(verify_once(make(server.url)))
    assert (reply.kind, reply.hallucination_flags, reply.guidance) == (kind, flags, guidance)
    assert server.attempts == 1


@pytest.mark.parametrize("action", [
    Action.empty(),
    Action.reply(None, reasoning_content="I ran out of tokens while thinking"),
    Action.reply("   \n"),
], ids=["empty", "null-content-with-reasoning", "whitespace"])
def test_empty_content_fails_without_retry(server, action):
    server.push(action)
    v = make(server.url)
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.FAILED and "empty content" in reply.error
    assert server.attempts == 1
    assert (v.failures, v.retries) == (1, 0)


def test_reply_without_guidance_text_is_failed_not_stop(server):
    server.push(Action.reply("...\n[SCORE] hallucination_detect=1"))
    reply = run(verify_once(make(server.url)))
    assert reply.kind is VerdictKind.FAILED and reply.hallucination_flags == [1]
    assert server.attempts == 1


# --------------------------------------------------------------------------------------------------------
# transient faults: retried, then success
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", [
    Action.error(500), Action.error(502), Action.error(503), Action.error(429),
    Action.malformed(), Action.no_choices(), Action.drop(), Action.truncate(), Action.hang(5.0),
], ids=["500", "502", "503", "429", "malformed-json", "no-choices", "drop", "truncate", "hang"])
def test_transient_fault_is_retried(server, fault):
    server.push(fault, Action.reply(GUIDE_TEXT))
    v = make(server.url, timeout=0.3)
    t0 = time.monotonic()
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.GUIDE and reply.guidance == "Step 2 is wrong."
    assert server.attempts == 2
    assert (v.calls, v.retries, v.failures) == (1, 1, 0)
    assert time.monotonic() - t0 < 3.0


def test_slow_reply_within_timeout_is_not_retried(server):
    server.push(Action.reply(GUIDE_TEXT, delay=0.3))
    v = make(server.url, timeout=2.0)
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.GUIDE and reply.latency_s >= 0.3
    assert server.attempts == 1 and v.retries == 0


# --------------------------------------------------------------------------------------------------------
# retries exhausted / not retried: FAILED, never STOP
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault, needle", [
    (Action.error(500), "HTTP 500"),
    (Action.error(503), "HTTP 503"),
    (Action.error(429), "HTTP 429"),
    (Action.malformed(), "not JSON"),
    (Action.drop(), "connection error"),
    (Action.hang(5.0), "timeout after 0.2s"),
], ids=["500", "503", "429", "malformed-json", "drop", "hang"])
def test_persistent_fault_fails_after_retries(server, fault, needle):
    server.default = fault
    v = make(server.url, timeout=0.2, max_retries=2)
    t0 = time.monotonic()
    reply = run(verify_once(v))
    elapsed = time.monotonic() - t0
    assert reply.kind is VerdictKind.FAILED
    assert needle in reply.error and "after 3 attempts" in reply.error
    assert server.attempts == 3
    assert (v.calls, v.retries, v.failures) == (1, 2, 1)
    assert reply.latency_s > 0 and elapsed < 3.0  # 3 × 0.2 s timeouts at most, plus tiny backoffs


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 301])
def test_client_errors_are_not_retried(server, status):
    server.default = Action.error(status, '{"error": "nope"}')
    v = make(server.url, max_retries=3)
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.FAILED
    assert f"HTTP {status}" in reply.error and "after 1 attempt" in reply.error
    assert server.attempts == 1 and v.retries == 0 and v.failures == 1


def test_zero_retries(server):
    server.default = Action.error(503)
    reply = run(verify_once(make(server.url, max_retries=0)))
    assert reply.kind is VerdictKind.FAILED and server.attempts == 1


def test_connection_refused_fails_after_retries():
    v = make(f"http://127.0.0.1:{free_port()}/v1", max_retries=2)
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.FAILED
    assert "connection error" in reply.error and "after 3 attempts" in reply.error
    assert (v.retries, v.failures) == (2, 1)


def test_invalid_url_fails_without_retry():
    v = make("ftp://127.0.0.1:1/v1", max_retries=3)
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.FAILED and "after 1 attempt" in reply.error and v.retries == 0


# --------------------------------------------------------------------------------------------------------
# backoff
# --------------------------------------------------------------------------------------------------------
def test_retry_after_seconds_is_honoured(server):
    server.push(Action.error(429, headers={"Retry-After": "1"}), Action.reply(GUIDE_TEXT))
    v = make(server.url, retry_interval=0.01, retry_max_interval=5.0)
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.GUIDE and server.attempts == 2
    gap = server.requests[1].received_at - server.requests[0].received_at
    assert 0.95 <= gap < 2.5


def test_retry_after_is_capped_at_max_interval(server):
    server.push(Action.error(503, headers={"Retry-After": "120"}), Action.reply(GUIDE_TEXT))
    v = make(server.url, retry_interval=0.01, retry_max_interval=0.1)
    t0 = time.monotonic()
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.GUIDE and time.monotonic() - t0 < 1.5


class _MaxRng(random.Random):
    """Full jitter always drawing its upper bound, to check the exponential schedule by timing."""

    def uniform(self, a, b):
        return b


def test_exponential_backoff_schedule(server):
    server.push(Action.error(500), Action.error(500), Action.error(500), Action.reply(GUIDE_TEXT))
    v = make(server.url, max_retries=3, retry_interval=0.1, retry_max_interval=0.25, rng=_MaxRng())
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.GUIDE and server.attempts == 4
    t = [r.received_at for r in server.requests]
    gaps = [b - a for a, b in zip(t, t[1:])]
    for gap, expected in zip(gaps, [0.1, 0.2, 0.25]):  # min(max, interval * 2**k)
        assert expected - 0.02 <= gap < expected + 0.5


def test_full_jitter_bounds():
    v = HttpVerifier("http://127.0.0.1:1/v1", retry_interval=0.5, retry_max_interval=3.0, rng=random.Random(1))
    for k in range(6):
        cap = min(3.0, 0.5 * 2 ** k)
        draws = [v._backoff(k, None) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in draws)
        assert max(draws) > 0.8 * cap and min(draws) < 0.2 * cap  # spread over the whole range
    assert v._backoff(0, 2.0) == 2.0 and v._backoff(0, 10.0) == 3.0


def test_retry_after_parsing():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert _retry_after_seconds("3") == 3.0
    assert _retry_after_seconds("0.5") == 0.5
    assert _retry_after_seconds("-4") == 0.0
    assert _retry_after_seconds(format_datetime(now + timedelta(seconds=7), usegmt=True), now=now) == 7.0
    assert _retry_after_seconds(format_datetime(now - timedelta(seconds=7), usegmt=True), now=now) == 0.0
    assert _retry_after_seconds("soon") is None and _retry_after_seconds(None) is None


# --------------------------------------------------------------------------------------------------------
# concurrency, event loops, metrics
# --------------------------------------------------------------------------------------------------------
def test_concurrency_bound(server):
    server.default = Action.reply(GUIDE_TEXT, delay=0.15)
    v = make(server.url, concurrency=2, timeout=2.0)

    async def scenario():
        try:
            return await asyncio.gather(*(v.verify(REQUEST) for _ in range(8)))
        finally:
            await v.aclose()

    t0 = time.monotonic()
    replies = run(scenario())
    elapsed = time.monotonic() - t0
    assert all(r.kind is VerdictKind.GUIDE for r in replies)
    assert server.attempts == 8
    assert server.max_in_flight == 2  # bounded, and actually concurrent
    assert elapsed >= 4 * 0.15 - 0.02
    assert v.calls == 8 and v.total_latency_s == pytest.approx(sum(r.latency_s for r in replies))


def test_reusable_across_event_loops(server):
    v = make(server.url)
    assert run(v.verify(REQUEST)).kind is VerdictKind.GUIDE
    assert run(v.verify(REQUEST)).kind is VerdictKind.GUIDE  # a new loop: client rebuilt
    run(v.aclose())
    run(v.aclose())  # idempotent
    assert server.attempts == 2 and v.calls == 2


def test_async_context_manager(server):
    async def scenario():
        async with make(server.url) as v:
            return await v.verify(REQUEST)

    assert run(scenario()).kind is VerdictKind.GUIDE


def test_from_config(server, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Judge the steps. Say {stop_token} when done.")
    cfg = VerifierConfig(base_url=server.url, model="m", http_timeout=1.5, http_max_retries=5,
                         http_retry_interval=0.02, http_retry_max_interval=0.04, http_concurrency=3,
                         temperature=0.0, top_p=1.0, top_k=8, max_tokens=12, stop_token="<<DONE>>",
                         prompt_template=str(prompt), api_key_env="")
    v = HttpVerifier.from_config(cfg)
    assert (v.timeout, v.max_retries, v.retry_interval, v.retry_max_interval, v.concurrency) == (1.5, 5, 0.02, 0.04, 3)
    server.push(Action.reply("<<DONE>>"))
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.STOP
    body = server.requests[0].body
    assert body["messages"][0] == {"role": "system", "content": "Judge the steps. Say <<DONE>> when done."}
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_k"]) == ("m", 12, 0.0, 8)


# --------------------------------------------------------------------------------------------------------
# secrets
# --------------------------------------------------------------------------------------------------------
def test_api_key_sources(monkeypatch, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(f"  {SECRET}-file\n")
    monkeypatch.setenv("MY_VERIFIER_KEY", f"{SECRET}-env")
    cfg = VerifierConfig(base_url="http://x/v1", api_key=f"{SECRET}-cfg", api_key_env="MY_VERIFIER_KEY",
                         api_key_file=str(key_file))
    assert resolve_api_key(cfg) == f"{SECRET}-cfg"
    cfg.api_key = ""
    assert resolve_api_key(cfg) == f"{SECRET}-env"
    monkeypatch.delenv("MY_VERIFIER_KEY")
    assert resolve_api_key(cfg) == f"{SECRET}-file"
    cfg.api_key_file = None
    assert resolve_api_key(cfg) is None
    cfg.api_key_file = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="api_key_file"):
        resolve_api_key(cfg)
    # an explicit argument wins over everything
    cfg.api_key_file, cfg.api_key = None, "cfg-key"
    assert HttpVerifier.from_config(cfg, api_key="arg-key")._api_key.reveal() == "arg-key"


def test_api_key_is_sent_but_never_leaked(server, monkeypatch, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)  # root: httpx / httpcore debug logs included
    monkeypatch.setenv("VERIFIER_API_KEY", SECRET)
    cfg = VerifierConfig(base_url=server.url, http_timeout=0.3, http_max_retries=1, http_retry_interval=0.01,
                         http_retry_max_interval=0.02)
    v = HttpVerifier.from_config(cfg)

    # sent to the server
    server.push(Action.reply(GUIDE_TEXT))
    assert run(v.verify(REQUEST)).kind is VerdictKind.GUIDE
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"

    # a careless server echoing the Authorization header, in a 401 and in retried 500s
    server.push(Action.echo_auth(401))
    reply_401 = run(v.verify(REQUEST))
    assert reply_401.kind is VerdictKind.FAILED and "HTTP 401" in reply_401.error
    assert "bad credentials: Bearer ***" in reply_401.error
    server.push(Action.echo_auth(500), Action.echo_auth(500))
    reply_500 = run(v.verify(REQUEST))
    assert reply_500.kind is VerdictKind.FAILED and "after 2 attempts" in reply_500.error

    # connection errors, with the key also in the URL user-info
    refused = HttpVerifier.from_config(cfg, system_prompt="x")
    refused.url = f"http://user:{SECRET}@127.0.0.1:{free_port()}/v1/chat/completions"
    reply_conn = run(verify_once(refused))
    assert reply_conn.kind is VerdictKind.FAILED and "connection error" in reply_conn.error
    run(v.aclose())

    cfg_dump = Config()
    cfg_dump.worker.rollout.verifier.api_key = SECRET
    save_resolved(cfg_dump, tmp_path / "resolved.yaml")

    leaks = {
        "repr": repr(v), "str": str(v), "vars": repr(vars(v)), "refused repr": repr(refused),
        "401 error": reply_401.error, "500 error": reply_500.error, "connection error": reply_conn.error,
        "raw_text": reply_401.raw_text + reply_500.raw_text, "logs": caplog.text,
        "log args": repr([r.args for r in caplog.records]),
        "saved config": (tmp_path / "resolved.yaml").read_text(),
    }
    assert "FAILED" in caplog.text  # failures are logged ...
    for where, text in leaks.items():
        assert SECRET not in text, f"API key leaked into {where}"  # ... without the key
    with pytest.raises(TypeError):
        pickle.dumps(v)


def test_redact():
    text = (f"Authorization: Bearer {SECRET}, url http://u:{SECRET}@h/v1?api_key={SECRET}&x=1 "
            f"access_token={SECRET}")
    out = _redact(text)
    assert SECRET not in out and "x=1" in out
    assert _redact(f"oops {SECRET} oops", SECRET) == "oops *** oops"


# --------------------------------------------------------------------------------------------------------
# end to end: a real (tiny, random) transformers model behind an OpenAI-style server
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second intra-op thread only waits on 2 shared cores
    model_dir = build_tiny_verifier_model(tmp_path_factory.mktemp("verifier") / "tiny-verifier")
    try:
        with TinyOpenAIServer(model_dir, api_key=SECRET) as s:
            yield s
    finally:
        torch.set_num_threads(threads)


def test_end_to_end_tiny_model(tiny_server, monkeypatch):
    monkeypatch.setenv("VERIFIER_API_KEY", SECRET)
    cfg = VerifierConfig(base_url=tiny_server.url, http_timeout=20.0, http_max_retries=1, http_retry_interval=0.01,
                         max_tokens=24, temperature=0.7, top_p=0.9, top_k=20)
    v = HttpVerifier.from_config(cfg)
    before = len(tiny_server.requests)
    reply = run(verify_once(v), limit=30.0)
    # random weights: random text, which parses as guidance or as unusable (FAILED), never an HTTP error
    assert reply.kind in (VerdictKind.GUIDE, VerdictKind.FAILED)
    assert reply.kind is not VerdictKind.FAILED or "HTTP" not in (reply.error or "")
    assert reply.latency_s > 0 and v.retries == 0
    (rec,) = tiny_server.requests[before:]
    assert rec.path == "/v1/chat/completions" and rec.headers["authorization"] == f"Bearer {SECRET}"
    assert [m["role"] for m in rec.body["messages"]] == ["system", "user"]
    assert rec.body["messages"] == build_verifier_messages(REQUEST, system_prompt=load_system_prompt(None))
    assert "### Problem\nCompute 41 + 9." in rec.body["messages"][1]["content"]
    assert (rec.body["max_tokens"], rec.body["top_k"]) == (24, 20)


def test_tiny_model_server_response_format_and_auth(tiny_server):
    body = {"model": "verifier", "messages": [{"role": "user", "content": "Step 1: 2+2=5"}], "max_tokens": 8,
            "temperature": 0.0}
    ok = httpx.post(tiny_server.url + "/chat/completions", json=body,
                    headers={"Authorization": f"Bearer {SECRET}"}, timeout=20)
    assert ok.status_code == 200
    data = ok.json()
    assert data["object"] == "chat.completion" and data["id"]
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert 1 <= data["usage"]["completion_tokens"] <= 8
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]

    # a verifier with the wrong key: 401, not retried, FAILED
    v = make(tiny_server.url, api_key="wrong-key", max_retries=3, timeout=5.0)
    before = len(tiny_server.requests)
    reply = run(verify_once(v))
    assert reply.kind is VerdictKind.FAILED and "HTTP 401" in reply.error
    assert len(tiny_server.requests) - before == 1


def test_redact_json_fields():
    out = _redact(f'{{"api_key": "{SECRET}", "model": "m", "token":{SECRET}}}')
    assert SECRET not in out and '"model": "m"' in out
