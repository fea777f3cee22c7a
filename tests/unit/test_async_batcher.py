"""AsyncBatchGenerator: concurrent requests share engine calls and get what a direct call gives."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from megatron_guided.rollout.batcher import AsyncBatchGenerator
from megatron_guided.rollout.engine import Completion, FinishReason, GenerationRequest, SamplingParams
from megatron_guided.rollout.hf_engine import HFEngine

from tests.conftest import random_qwen2

VOCAB = 64


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    model = random_qwen2(seed=0, vocab_size=VOCAB, max_positions=256)
    return HFEngine(model, eos_token_ids=[], pad_token_id=0)


class CountingEngine:
    """Wraps an engine, recording each generate call's batch size (and optionally slowing it down)."""

    def __init__(self, inner, delay_s: float = 0.0):
        self.inner = inner
        self.delay_s = delay_s
        self.calls: list[int] = []
        self.released: list[str] = []
        self.weight_version = 0
        self.busy = threading.Lock()

    def generate(self, requests):
        assert self.busy.acquire(blocking=False), "engine called concurrently"
        try:
            self.calls.append(len(requests))
            time.sleep(self.delay_s)
            return self.inner.generate(requests)
        finally:
            self.busy.release()

    def release_session(self, session_id):
        self.released.append(session_id)
        self.inner.release_session(session_id)

    def update_weights(self, named_tensors):
        self.inner.update_weights(named_tensors)

    def flush_cache(self):
        self.inner.flush_cache()


def _requests(n: int, max_new: int = 6, session: bool = False) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        sampling = SamplingParams(max_new_tokens=max_new, temperature=0.0)
        out.append(GenerationRequest(prompt_ids=prompt, sampling=sampling, session_id=f"s{i}" if session else None))
    return out


def test_concurrent_requests_share_one_engine_call_and_match_direct_generate(engine):
    requests = _requests(16)
    direct = engine.generate(requests)
    counting = CountingEngine(engine)
    batcher = AsyncBatchGenerator(counting)

    async def main():
        return await asyncio.gather(*(batcher.generate(r) for r in requests))

    results = asyncio.run(main())
    assert counting.calls == [16]
    assert batcher.num_engine_calls == 1 and batcher.num_requests == 16
    for got, want in zip(results, direct):
        assert isinstance(got, Completion)
        assert got.token_ids == want.token_ids and got.finish_reason is FinishReason.LENGTH
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert len({tuple(r.token_ids) for r in results}) > 1  # not a degenerate model


def test_requests_arriving_during_a_call_form_the_next_batch(engine):
    counting = CountingEngine(engine, delay_s=0.05)
    batcher = AsyncBatchGenerator(counting, window_s=0.0)
    requests = _requests(12)

    async def staggered():
        first = [asyncio.create_task(batcher.generate(r)) for r in requests[:4]]
        await asyncio.sleep(0.02)  # the first batch is running in its thread; the loop is still free
        later = [asyncio.create_task(batcher.generate(r)) for r in requests[4:]]
        return await asyncio.gather(*first, *later)

    results = asyncio.run(staggered())
    assert counting.calls == [4, 8]
    assert [r.token_ids for r in results] == [c.token_ids for c in engine.generate(requests)]


def test_max_batch_size_sessions_cancellation_and_failures(engine):
    counting = CountingEngine(engine)
    batcher = AsyncBatchGenerator(counting, max_batch_size=5)
    requests = _requests(11)

    async def capped():
        return await batcher.generate_many(requests)

    assert len(asyncio.run(capped())) == 11 and counting.calls == [5, 5, 1]

    # Two requests of one session never share a call; releases are applied after the call in flight.
    counting.calls.clear()
    a, b = _requests(2, session=True)
    b.session_id = a.session_id

    async def same_session():
        out = await asyncio.gather(batcher.generate(a), batcher.generate(b))
        batcher.release_session(a.session_id)
        return out

    asyncio.run(same_session())
    assert counting.calls == [1, 1] and counting.released == [a.session_id] and engine.num_sessions == 0

    # A bad request fails alone; its batch mates still get their completions. A cancelled caller is dropped.
    counting.calls.clear()
    bad = GenerationRequest(prompt_ids=[VOCAB + 5], sampling=SamplingParams(max_new_tokens=2, temperature=0.0))
    good = _requests(3)

    async def with_failure():
        cancelled = asyncio.create_task(batcher.generate(good[2]))
        tasks = [asyncio.create_task(batcher.generate(r)) for r in (good[0], bad, good[1])]
        await asyncio.sleep(0)
        cancelled.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    out = asyncio.run(with_failure())
    assert isinstance(out[1], ValueError) and "outside" in str(out[1])
    assert [o.token_ids for o in (out[0], out[2])] == [c.token_ids for c in engine.generate(good[:2])]
    assert counting.calls == [3, 1, 1, 1]  # the batch (without the cancelled one), then one by one

    async def closed():
        await batcher.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.generate(good[0])

    asyncio.run(closed())
