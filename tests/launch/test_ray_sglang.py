"""SGLang engines placed by Ray, end to end on CPU: a private Ray instance, 2 Megatron ranks (TP=2 on
gloo), and the policy's and the model verifier's SGLang servers each launched by an actor in its engine
slot; the driver's engines attach to the URLs the actors report. Two guided GRPO steps run (the policy
server weight-synced after each), and no SGLang process is left afterwards. Needs the SGLang venv
(SGLANG_PYTHON, see the README), skipped otherwise."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import pytest

from megatron_guided.config import load_config
from megatron_guided.train.main import build_trainer
from tests.integration.test_grpo_loop import read_metrics
from tests.integration.test_sglang_grpo import sglang_overrides, sglang_pids, wait_gone
from tests.launch.test_ray_launch import guided_two_steps

ray = pytest.importorskip("ray")
pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.megatron, pytest.mark.ray, pytest.mark.sglang]


def pids_serving(model_dir: Path) -> set[int]:
    """SGLang processes whose command line names `model_dir` (this session's model: other sessions on the
    machine may run SGLang servers of their own)."""
    pids = set()
    for pid in sglang_pids():
        try:
            if str(model_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
        except OSError:
            continue
    return pids


def parent_of(pid: int) -> tuple[int, str]:
    """(parent pid, parent's command line) of `pid`."""
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return ppid, Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


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
