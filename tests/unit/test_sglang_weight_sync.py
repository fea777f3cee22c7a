"""Weight sync trainer → SGLang, and the engine's update sequence, without a real server.

Disk sync is checked here for its files and against a real server in
tests/integration/test_sglang_engine.py. Tensor sync and memory release need GPUs: here they run
against the protocol stub (tests/servers/sglang_stub.py); distributed sync is in
tests/integration/test_sglang_distributed_sync.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_guided.rollout.sglang import weight_sync as ws
from megatron_guided.rollout.sglang.engine import SGLangEngine
from megatron_guided.rollout.sglang.server import SGLangServer
from tests.conftest import random_qwen2
from tests.servers.sglang_stub import SGLangStub


@pytest.fixture
def stub():
    server = SGLangStub().start()
    yield server
    server.stop()


def engine_on(stub: SGLangStub, sync: ws.WeightSync | None, device: str = "cuda") -> SGLangEngine:
    return SGLangEngine([SGLangServer(url=stub.base_url)], vocab_size=64, weight_sync=sync, device=device,
                        retry_interval_s=0.01)


def named(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.state_dict().items())


def test_buckets_are_bounded_and_tied_aliases_sent_once():
    model = random_qwen2()
    items = named(model)
    assert any(n == "lm_head.weight" for n, _ in items)  # tied: an alias of the embedding in state_dict
    buckets = list(ws.iter_buckets(items, bucket_bytes=40_000))
    sent = [n for b in buckets for n, _ in b]
    assert "lm_head.weight" not in sent and len(sent) == len(items) - 1
    for bucket in buckets:
        sizes = [t.numel() * t.element_size() for _, t in bucket]
        assert len(bucket) == 1 or sum(sizes) <= 40_000


def test_disk_sync_writes_one_complete_version_atomically(tmp_path):
    model = random_qwen2()
    sync = ws.DiskWeightSync(tmp_path, bucket_bytes=60_000)
    path = sync.write(named(model), "3")
    assert path == tmp_path / "v3" and sorted(p.name for p in tmp_path.iterdir()) == ["v3"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    loaded = {k: v for shard in shards for k, v in load_file(str(path / shard)).items()}
    expected = {n: t for n, t in named(model) if n != "lm_head.weight"}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_disk_sync_failure_leaves_no_partial_version(tmp_path, monkeypatch):
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        Path(filename).write_bytes(b"x")

    monkeypatch.setattr(ws, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ws.DiskWeightSync(tmp_path, bucket_bytes=60_000).write(named(random_qwen2()), "1")
    assert list(tmp_path.iterdir()) == []


def test_update_sequence_pause_update_flush_continue_and_version_check(stub):
    """update_weights: pause → tensor buckets (flush and version on the last only) → flush → continue →
    the version read back; the payload is SGLang's: base64 ForkingPickler of (name, tensor) pairs."""
    model = random_qwen2()
    engine = engine_on(stub, ws.TensorWeightSync(bucket_bytes=60_000, tp_size=2))
    try:
        assert engine.weight_version == 0
        engine.update_weights(named(model))
        assert engine.weight_version == 1
        updates = stub.bodies("/update_weights_from_tensor")
        assert stub.paths() == ["/model_info", "/pause_generation"] + ["/update_weights_from_tensor"] * len(updates) + [
            "/flush_cache", "/continue_generation", "/model_info"]
        assert stub.bodies("/pause_generation") == [{"mode": "in_place"}]
        assert [u["flush_cache"] for u in updates] == [False] * (len(updates) - 1) + [True]
        assert [u["weight_version"] for u in updates] == [None] * (len(updates) - 1) + ["1"]
        from multiprocessing.reduction import ForkingPickler

        received = {}
        for body in updates:
            first, second = body["serialized_named_tensors"]
            assert first == second  # one copy per TP rank
            received.update(dict(ForkingPickler.loads(base64.b64decode(first))))
        expected = {n: t for n, t in named(model) if n != "lm_head.weight"}
        assert received.keys() == expected.keys()
        assert all(torch.equal(received[k], expected[k]) for k in expected)
        # completions are stamped with the server's version
        completion = engine.generate([_request()])[0]
        assert completion.weight_version == 1
    finally:
        engine.close()


def test_update_fails_when_a_server_does_not_report_the_new_version(stub):
    stub.on_request["/model_info"] = lambda body: setattr(stub, "weight_version", "default")
    engine = engine_on(stub, ws.TensorWeightSync(bucket_bytes=1 << 30))
    try:
        with pytest.raises(RuntimeError, match=r"report weight_version \['default'\], expected '1'"):
            engine.update_weights(named(random_qwen2()))
        assert "/continue_generation" in stub.paths()  # generation is never left paused
    finally:
        engine.close()


def test_frozen_engine_refuses_updates(stub):
    engine = engine_on(stub, None)
    try:
        with pytest.raises(RuntimeError, match="frozen"):
            engine.update_weights(named(random_qwen2()))
    finally:
        engine.close()


def test_memory_release_is_refused_on_cpu_and_sent_on_gpu(stub):
    cpu = engine_on(stub, None, device="cpu")
    try:
        with pytest.raises(RuntimeError, match="GPU-only: SGLang's CPU engine crashes"):
            cpu.release_memory()
        assert "/release_memory_occupation" not in stub.paths()
    finally:
        cpu.close()
    gpu = engine_on(stub, None, device="cuda")
    try:
        gpu.release_memory(["kv_cache"])
        gpu.resume_memory(["kv_cache"])
        assert stub.bodies("/release_memory_occupation") == [{"tags": ["kv_cache"]}]
        assert stub.bodies("/resume_memory_occupation") == [{"tags": ["kv_cache"]}]
    finally:
        gpu.close()


def _request():
    from megatron_guided.rollout.engine import GenerationRequest, SamplingParams

    return GenerationRequest(prompt_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=2, temperature=0))
