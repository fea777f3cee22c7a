"""Guided GRPO with SGLang serving the policy and the model verifier (examples/tiny_cpu_guided_sglang.yaml),
and no server left behind when the trainer is killed. Real SGLang servers on 127.0.0.1; needs the
SGLang venv (SGLANG_PYTHON, see the README), skipped otherwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_guided.config import load_config
from megatron_guided.train.main import build_trainer
from tests.conftest import SGLANG_STUBS, sglang_python

pytestmark = [pytest.mark.integration, pytest.mark.sglang]

REPO = Path(__file__).resolve().parents[2]


def sglang_pids() -> set[int]:
    """Processes whose command line mentions sglang (servers and their sglang::* children)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"sglang" in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def pids_serving(model_dir: Path) -> set[int]:
    """SGLang server processes whose command line names `model_dir` (this session's model: other sessions
    on the machine may run SGLang servers of their own, which must not count as ours)."""
    pids = set()
    for pid in sglang_pids():
        try:
            if str(model_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
        except OSError:
            continue
    return pids


def wait_gone(pids: set[int], timeout_s: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = pids & sglang_pids()
        if not pids:
            return pids
        time.sleep(0.2)
    return pids


def sglang_overrides(prefix: str) -> list[str]:
    return [f"{prefix}.python={sglang_python()}", f"{prefix}.pythonpath=[{SGLANG_STUBS}]",
            f"{prefix}.startup_timeout_s=300", f"{prefix}.env.OMP_NUM_THREADS=1"]


def test_guided_grpo_with_sglang_policy_and_verifier(tiny_model_dir, arith_data_dir, tmp_path):
    """Two steps of the shipped SGLang example on the tiny model: the policy server is weight-synced
    after each step, the verifier server answers every guided turn, the radix cache serves the
    re-sent dialogue, and both servers are gone after the run."""
    before = pids_serving(tiny_model_dir)
    cfg = load_config([
        "config=examples/tiny_cpu_guided_sglang.yaml",
        f"data.train_files={arith_data_dir / 'train.jsonl'}", f"data.val_files={arith_data_dir / 'test.jsonl'}",
        "data.max_response_length=24", "data.rollout_batch_size=4", "data.val_max_samples=4",
        "worker.actor.global_batch_size=4", f"worker.actor.model.model_path={tiny_model_dir}",
        "worker.rollout.n=4", "worker.rollout.verifier.guided_fraction=1.0",
        f"worker.rollout.verifier.model_path={tiny_model_dir}", "worker.rollout.verifier.max_tokens=16",
        "worker.rollout.verifier.max_tokens_per_turn=16", "worker.rollout.verifier.max_trajectory_tokens=64",
        "trainer.max_steps=2", "trainer.val_freq=-1", "trainer.val_before_train=false", "trainer.num_threads=1",
        f"trainer.output_dir={tmp_path / 'out'}", f"trainer.save_checkpoint_path={tmp_path / 'ckpt'}",
        "trainer.logger=[file]",
        *sglang_overrides("worker.rollout.sglang"), *sglang_overrides("worker.rollout.verifier.sglang")])
    trainer = build_trainer(cfg)
    assert len(pids_serving(tiny_model_dir) - before) >= 2  # the policy's and the verifier's servers
    trainer.fit()

    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        # the random tiny verifier sometimes replies without any text (a FAILED reply by design); every
        # other reply is guidance that the policy continues from
        assert m["verifier/calls"] > 0 and m["verifier/failures"] < m["verifier/calls"] / 2
        assert m["guided/corrections_mean"] > 0 and m["guided/turns_mean"] > 1.0
        assert m["engine/prefix_reuse"] >= 0.9
        assert abs(m["actor/rollout_logprob_abs_diff"]) < 1e-3  # rollout log-probs are the trainer's
    synced = sorted(p.name for p in (tmp_path / "out" / "weight_sync").iterdir())
    assert synced == ["v2"]  # one version per step, older ones pruned, no temp folders
    assert (tmp_path / "out" / "sglang" / "policy").is_dir() and (tmp_path / "out" / "sglang" / "verifier").is_dir()
    assert not wait_gone(pids_serving(tiny_model_dir) - before), "SGLang processes left after the run"


TRAINER = """
import os, sys
from pathlib import Path
from megatron_guided.rollout.sglang.engine import SGLangEngine
from tests.conftest import cpu_sglang_config
engine = SGLangEngine.from_config(cpu_sglang_config(), model_path=sys.argv[1], log_dir=Path(sys.argv[2]), frozen=True)
print(engine.servers[0].pid, flush=True)
os.kill(os.getpid(), 9)  # a trainer crash: no finally, no atexit
"""


def test_no_orphan_server_after_a_trainer_crash(tiny_model_dir, tmp_path):
    before = pids_serving(tiny_model_dir)
    env = dict(os.environ, PYTHONPATH=str(REPO), SGLANG_PYTHON=sglang_python())
    trainer = subprocess.run([sys.executable, "-c", TRAINER, str(tiny_model_dir), str(tmp_path)], check=False,
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert trainer.returncode == -signal.SIGKILL, trainer.stderr[-2000:]
    server_pid = int(trainer.stdout.split()[0])
    assert not wait_gone((pids_serving(tiny_model_dir) - before) | {server_pid}), "SGLang processes outlived the trainer"
