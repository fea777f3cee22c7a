"""SGLang engines placed by Ray. End to end on CPU: a private Ray instance, 2 Megatron ranks (TP=2 on
gloo), and the policy's and the model verifier's SGLang servers each launched by an actor in its engine
slot; the driver's engines attach to the URLs the actors report. Two guided GRPO steps run (the policy
server weight-synced after each), and no SGLang process is left afterwards (needs the SGLang venv,
SGLANG_PYTHON, see the README; skipped otherwise). And the actors' teardown, with the fake server of
tests/servers/fake_sglang: a closed cluster and a killed actor both leave no server behind."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

import pytest

from megatron_guided.config import ClusterConfig, SGLangConfig, load_config
from megatron_guided.launch.placement import plan_placement
from megatron_guided.train.main import build_trainer
from tests.integration.test_grpo_loop import read_metrics
from tests.integration.test_sglang_grpo import pids_serving, sglang_overrides, wait_gone
from tests.launch.test_ray_launch import guided_two_steps

ray = pytest.importorskip("ray")
pytest.importorskip("megatron.core")
pytestmark = pytest.mark.ray

FAKE_SGLANG = Path(__file__).resolve().parents[1] / "servers" / "fake_sglang"


def parent_of(pid: int) -> tuple[int, str]:
    """(parent pid, parent's command line) of `pid`."""
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return ppid, Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.megatron
@pytest.mark.sglang
def test_guided_grpo_with_sglang_servers_in_ray_actors(tiny_model_dir, arith_data_dir, tmp_path, caplog):
    assert not pids_serving(tiny_model_dir)
    cfg = load_config(guided_two_steps(tiny_model_dir, arith_data_dir, tmp_path) + [
        "worker.actor.strategy=megatron", "worker.actor.megatron.tp=2", "cluster.launcher=ray",
        "worker.rollout.engine=sglang", "worker.rollout.verifier.type=model", "worker.rollout.verifier.engine=sglang",
        f"worker.rollout.verifier.model_path={tiny_model_dir}", "worker.rollout.verifier.max_tokens=8",
        "worker.rollout.verifier.prompt_template=examples/verifier_prompt_tiny.txt",
        *(f"{p}.{key}" for p in ("worker.rollout.sglang", "worker.rollout.verifier.sglang")
          for key in ("device=cpu", "dtype=float32", "mem_fraction_static=0.05",
                      "extra_args=[--max-total-tokens,65536]")),
        *sglang_overrides("worker.rollout.sglang"), *sglang_overrides("worker.rollout.verifier.sglang")])
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="megatron_guided.launch.ray_sglang"):
        trainer = build_trainer(cfg)
    print(f"\nbuild_trainer (Ray, 2 ranks, 2 SGLang server actors): {time.perf_counter() - started:.1f} s")
    ready = [r.getMessage() for r in caplog.records if "healthy after" in r.getMessage()]
    print("\n".join(ready))
    try:
        reported = {re.search(r"server (\S+) \(pid (\d+)\)", m).groups() for m in ready}
        assert len(reported) == 2  # the policy's and the verifier's
        for _, pid in reported:  # launched by their actors, not by this driver
            ppid, parent = parent_of(int(pid))
            assert ppid != os.getpid() and "SGLangServerActor" in parent, parent
        policy = trainer.engine.servers
        assert len(policy) == 1 and policy[0].process is None  # attached, not launched here
        assert policy[0].url in {url for url, _ in reported}
        assert cfg.worker.rollout.sglang.urls == []  # the caller's config is left as it was
    except BaseException:
        trainer.close()
        raise
    trainer.fit()  # closes the trainer: engines, ranks, server actors, Ray
    print(f"whole run: {time.perf_counter() - started:.1f} s")

    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["verifier/calls"] > 0
        assert abs(m["actor/rollout_logprob_abs_diff"]) < 1e-3  # the synced server's log-probs are the trainer's
    assert sorted(p.name for p in (tmp_path / "out" / "weight_sync").iterdir()) == ["v2"]
    assert not ray.is_initialized()
    assert not wait_gone(pids_serving(tiny_model_dir)), "SGLang processes left after the run"


def test_server_actors_leave_no_server_when_closed_or_killed(tmp_path):
    from megatron_guided.launch.ray_cluster import RayCluster
    from megatron_guided.launch.ray_sglang import start_sglang_servers

    cluster = ClusterConfig(launcher="ray")
    fake = SGLangConfig(python=sys.executable, pythonpath=[str(FAKE_SGLANG)], device="cpu", startup_timeout_s=60.0,
                        env={"FAKE_SGLANG_MODE": "ok"})
    ray_cluster = RayCluster(cluster, plan_placement(cluster, world_size=1, engines=("policy_engine", "verifier_engine")))
    try:
        urls = start_sglang_servers(ray_cluster, {kind: (str(tmp_path / kind), fake, tmp_path / "logs")
                                                  for kind in ("policy_engine", "verifier_engine")}, on_node_ip=False)
        assert all(len(u) == 1 and u[0].startswith("http://127.0.0.1:") for u in urls.values())
        policy, verifier = (pids_serving(tmp_path / kind) for kind in ("policy_engine", "verifier_engine"))
        assert policy and verifier
        (actor,) = [a for name, a in ray_cluster.actors if name == "sglang-verifier_engine0"]
        ray.kill(actor, no_restart=True)  # no close(): the kernel's parent-death signal stops the server
        assert not wait_gone(verifier, timeout_s=20), "a killed actor's server outlived it"
    finally:
        ray_cluster.close()  # the policy actor's close() stops its server
    assert not wait_gone(policy, timeout_s=20) and not ray.is_initialized()
