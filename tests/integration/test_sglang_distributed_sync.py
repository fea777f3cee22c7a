"""Distributed weight sync on CPU: the HTTP protocol against the stub (tests/servers/sglang_stub.py) with a
real gloo broadcast to a peer process that joins the update group as SGLang's servers do (with SGLang's
own group helper when the SGLang venv is there). On GPUs the same code runs on NCCL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_guided.rollout.sglang import weight_sync as ws
from megatron_guided.utils.net import free_port
from tests.conftest import SGLANG_STUBS, random_qwen2, sglang_python
from tests.servers.sglang_stub import SGLangStub
from tests.unit.test_sglang_weight_sync import engine_on, named

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stub():
    server = SGLangStub().start()
    yield server
    server.stop()


class DistPeer:
    """Plays the server ranks behind the stub: joins the group on /init_weights_update_group and receives
    each /update_weights_from_distributed bucket by broadcast before the stub answers."""

    def __init__(self, stub: SGLangStub, out: Path, *, python: str, impl: str) -> None:
        self.stub, self.out, self.python, self.impl = stub, out, python, impl
        self.process: subprocess.Popen | None = None
        stub.on_request["/init_weights_update_group"] = self.join
        stub.on_request["/update_weights_from_distributed"] = self.receive

    def join(self, body: dict) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(SGLANG_STUBS)]), SGLANG_USE_CPU_ENGINE="1")
        self.process = subprocess.Popen(
            [self.python, "-m", "tests.servers.dist_peer", "--init-method",
             f"tcp://{body['master_address']}:{body['master_port']}", "--world-size", str(body["world_size"]),
             "--rank", str(body["rank_offset"]), "--group-name", body["group_name"], "--out", str(self.out),
             "--impl", self.impl], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        assert self.process.stdout.readline().strip() == "joined"

    def receive(self, body: dict) -> None:
        self.process.stdin.write(json.dumps(body) + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "ok"

    def finish(self) -> dict[str, torch.Tensor]:
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0
        return load_file(str(self.out))


def run_distributed_sync(stub: SGLangStub, tmp_path: Path, *, python: str, impl: str) -> None:
    peer = DistPeer(stub, tmp_path / "received.safetensors", python=python, impl=impl)
    sync = ws.DistributedWeightSync(bucket_bytes=60_000, tp_sizes=[1], master_address="127.0.0.1",
                                    master_port=free_port(), backend="gloo", group_name=f"test-{impl}")
    engine = engine_on(stub, sync)
    model = random_qwen2()
    try:
        engine.update_weights(named(model))
    finally:
        engine.close()
    received = peer.finish()
    init = stub.bodies("/init_weights_update_group")
    assert init == [{"master_address": "127.0.0.1", "master_port": sync.master_port, "rank_offset": 1,
                     "world_size": 2, "group_name": f"test-{impl}", "backend": "gloo"}]
    updates = stub.bodies("/update_weights_from_distributed")
    assert len(updates) > 1 and [u["flush_cache"] for u in updates][-1] is True
    assert updates[0]["dtypes"][0] == "float32" and updates[-1]["weight_version"] == "1"
    expected = {n: t for n, t in named(model) if n != "lm_head.weight"}
    assert received.keys() == expected.keys()
    assert all(torch.equal(received[k], expected[k]) for k in expected)


def test_distributed_sync_broadcasts_every_bucket_to_the_server_ranks(stub, tmp_path):
    run_distributed_sync(stub, tmp_path, python=sys.executable, impl="ours")


@pytest.mark.sglang
def test_distributed_sync_group_is_compatible_with_sglangs_own(stub, tmp_path):
    """The peer joins with SGLang's init_custom_process_group (what its servers call), from the SGLang venv."""
    run_distributed_sync(stub, tmp_path, python=sglang_python(), impl="sglang")
