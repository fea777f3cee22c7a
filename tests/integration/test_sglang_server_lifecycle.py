"""Server lifecycle: command line, health wait with clear errors, teardown, no orphans after a crash.

A fake ``sglang.launch_server`` (tests/servers/fake_sglang) stands in for the real one here, which
costs ~20 s to start; tests/integration/test_sglang_grpo.py repeats the orphan check with a real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_guided.config import SGLangConfig
from megatron_guided.rollout.sglang.server import (
    SGLangServerError,
    server_command,
    server_env,
    start_servers,
)
from tests.servers.sglang_stub import SGLangStub

pytestmark = pytest.mark.integration

FAKE = Path(__file__).resolve().parents[1] / "servers" / "fake_sglang"
REPO = Path(__file__).resolve().parents[2]


def fake_config(**overrides) -> SGLangConfig:
    return SGLangConfig(**{"python": sys.executable, "pythonpath": [str(FAKE)], "device": "cpu",
                           "startup_timeout_s": 20.0} | overrides)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_command_and_environment():
    cfg = SGLangConfig(python="/venv/bin/python", device="cpu", dtype="float32", tp_size=2,
                       mem_fraction_static=0.05, extra_args=["--max-total-tokens", "65536"],
                       pythonpath=["/stubs"])
    assert server_command("/m", cfg, port=1234) == [
        "/venv/bin/python", "-m", "sglang.launch_server", "--model-path", "/m", "--host", "127.0.0.1",
        "--port", "1234", "--tp-size", "2", "--mem-fraction-static", "0.05", "--dtype", "float32",
        "--device", "cpu", "--enable-cache-report", "--attention-backend", "torch_native",
        "--image-processor-backend", "pil", "--max-total-tokens", "65536"]
    cfg.env = {"OMP_NUM_THREADS": "1"}
    env = server_env(cfg, {"PYTHONPATH": "/old", "HOME": "/root"})
    assert env == {"PYTHONPATH": "/stubs" + os.pathsep + "/old", "HOME": "/root", "SGLANG_USE_CPU_ENGINE": "1",
                   "OMP_NUM_THREADS": "1"}
    gpu = SGLangConfig(device="cuda")
    assert "--attention-backend" not in server_command("/m", gpu, port=1) and "SGLANG_USE_CPU_ENGINE" not in server_env(gpu, {})


def test_launch_wait_and_stop(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SGLANG_MODE", "ok")
    servers = start_servers("/model", fake_config(num_replicas=2), log_dir=tmp_path)
    try:
        assert len({s.url for s in servers}) == 2 and all(s.url.startswith("http://127.0.0.1:") for s in servers)
        assert "'--model-path', '/model'" in servers[0].log_tail()
    finally:
        for s in servers:
            s.stop()
    assert all(s.process.returncode is not None for s in servers)


def test_a_crashing_server_fails_fast_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SGLANG_MODE", "crash")
    start = time.monotonic()
    with pytest.raises(SGLangServerError, match=r"(?s)exited with code 3; last lines of .*fake scheduler failed"):
        start_servers("/model", fake_config(), log_dir=tmp_path)
    assert time.monotonic() - start < 15


def test_an_unhealthy_server_times_out_and_is_stopped(tmp_path, monkeypatch):
    pidfile = tmp_path / "pid"
    monkeypatch.setenv("FAKE_SGLANG_MODE", "unhealthy")
    monkeypatch.setenv("FAKE_SGLANG_PIDFILE", str(pidfile))
    with pytest.raises(SGLangServerError, match=r"(?s)not healthy after 3 s \(last: HTTP 503\).*fake sglang starting"):
        start_servers("/model", fake_config(startup_timeout_s=3.0), log_dir=tmp_path)
    assert not pid_alive(int(pidfile.read_text()))


def test_attach_checks_health_and_never_stops_the_server():
    with SGLangStub() as stub:
        (server,) = start_servers("/ignored", SGLangConfig(urls=[stub.base_url + "/"]), log_dir=Path("/nonexistent"))
        assert server.url == stub.base_url and server.process is None
        server.stop()
        assert stub.paths()[-1] == "/health"


TRAINER = """
import sys, time
from pathlib import Path
from megatron_guided.rollout.sglang.server import start_servers
from tests.integration.test_sglang_server_lifecycle import fake_config
start_servers("/model", fake_config(), log_dir=Path(sys.argv[1]))
print("ready", flush=True)
time.sleep(600)
"""


def test_no_orphan_server_when_the_trainer_is_killed(tmp_path):
    """SIGKILL of the launching process (no atexit, no finally) still takes the server down."""
    pidfile = tmp_path / "pid"
    env = dict(os.environ, FAKE_SGLANG_MODE="ok", FAKE_SGLANG_PIDFILE=str(pidfile), PYTHONPATH=str(REPO))
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               env=env, cwd=REPO)
    try:
        assert trainer.stdout.readline().strip() == "ready"
        server_pid = int(pidfile.read_text())
        assert pid_alive(server_pid)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 10
        while pid_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(server_pid)
    finally:
        trainer.kill()
