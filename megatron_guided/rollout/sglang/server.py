"""SGLang server processes: launch, attach, wait for health, tear down without orphans.

A launched server is ``<python> -m sglang.launch_server --model-path ... --host ... --port ...`` in its
own session (process group), with stdout/stderr in a log file. It is stopped (SIGTERM to the group,
SIGKILL after a grace period) by :meth:`SGLangServer.stop`, by an ``atexit`` hook when this process ends
normally or on an exception / Ctrl-C, and by the kernel when this process is killed outright
(``PR_SET_PDEATHSIG`` on Linux: the server gets SIGTERM when the thread that launched it dies, so launch
from a thread that lives as long as the servers should, normally the main thread; SGLang's own
subprocesses die with it). Attached servers (``worker.rollout.sglang.urls``) are never stopped.

On ``device=cpu`` the server runs SGLang's CPU engine: ``SGLANG_USE_CPU_ENGINE=1``, the
``torch_native`` attention backend (see ``../shared/reference/serving-on-cpu.md``) and the PIL image
processor (vision-language models; the torchvision one is for GPU hosts). On a machine without the CUDA
kernel package, ``tests/sglang_stubs`` must be on ``pythonpath``.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from megatron_guided.config import SGLangConfig
from megatron_guided.utils.net import free_port

__all__ = ["SGLangServer", "SGLangServerError", "server_command", "server_env", "start_servers"]

log = logging.getLogger(__name__)

_LIVE: set[SGLangServer] = set()
_LIVE_LOCK = threading.Lock()


class SGLangServerError(RuntimeError):
    """A server did not start, died, or cannot be reached; the message carries its log tail."""


def server_command(model_path: str, cfg: SGLangConfig, *, port: int) -> list[str]:
    """The launch command line for one replica (``cfg.extra_args`` last, unchanged)."""
    cmd = [cfg.python or sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--host", cfg.host, "--port", str(port), "--tp-size", str(cfg.tp_size),
           "--mem-fraction-static", str(cfg.mem_fraction_static), "--dtype", cfg.dtype,
           "--device", cfg.device, "--enable-cache-report"]
    if cfg.device == "cpu":
        cmd += ["--attention-backend", "torch_native", "--image-processor-backend", "pil"]
    return cmd + list(cfg.extra_args)


def server_env(cfg: SGLangConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The servers' environment: ``base`` (default ``os.environ``), ``cfg.env``, the CPU switch and
    PYTHONPATH."""
    env = dict(os.environ if base is None else base) | dict(cfg.env)
    if cfg.device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    if cfg.pythonpath:
        paths = [str(Path(p).resolve()) for p in cfg.pythonpath]
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@dataclass(eq=False)
class SGLangServer:
    """One server: launched (``process`` set, stopped by us) or attached (``process`` None)."""

    url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @classmethod
    def launch(cls, model_path: str, cfg: SGLangConfig, *, port: int, log_path: Path) -> SGLangServer:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = server_command(model_path, cfg, port=port)
        if sys.platform.startswith("linux"):
            cmd = [cmd[0], "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
        with open(log_path, "ab") as out:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       env=server_env(cfg), start_new_session=True)
        server = cls(url=f"http://{cfg.host}:{port}", process=process, log_path=log_path)
        with _LIVE_LOCK:
            _LIVE.add(server)
        log.info("launched sglang server %s (pid %d), log %s", server.url, process.pid, log_path)
        return server

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def check_alive(self) -> None:
        """Raise :class:`SGLangServerError` (exit code + log tail) if a launched server has exited."""
        if self.process is None:
            return
        code = self.process.poll()
        if code is not None:
            raise SGLangServerError(f"sglang server {self.url} (pid {self.process.pid}) exited with code {code}"
                                    f"{self._tail_message()}")

    def wait_ready(self, timeout_s: float) -> float:
        """Poll ``GET /health`` until 200; returns the seconds waited. Fails early if the process dies."""
        start = time.monotonic()
        last_error = "no answer yet"
        with httpx.Client(timeout=5.0, trust_env=False) as http:
            while True:
                self.check_alive()
                try:
                    response = http.get(f"{self.url}/health")
                    if response.status_code == 200:
                        return time.monotonic() - start
                    last_error = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() - start > timeout_s:
                    raise SGLangServerError(f"sglang server {self.url} not healthy after {timeout_s:.0f} s "
                                            f"(last: {last_error}){self._tail_message()}")
                time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _tail_message(self) -> str:
        tail = self.log_tail()
        return f"; last lines of {self.log_path}:\n{tail}" if tail else ""

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``timeout_s``. Idempotent;
        attached servers are left alone."""
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self.process is None or (self.process.returncode is not None and not _group_alive(self.process.pid)):
            return
        pgid = self.process.pid  # start_new_session: the server leads its own group
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group_alive(pgid):
            self.process.poll()
            time.sleep(0.1)
        if _group_alive(pgid):
            log.warning("sglang server %s did not stop within %.0f s; killing it", self.url, timeout_s)
            _signal_group(pgid, signal.SIGKILL)
        self.process.wait()


def start_servers(model_path: str, cfg: SGLangConfig, *, log_dir: Path) -> list[SGLangServer]:
    """Attach to ``cfg.urls``, or launch ``cfg.num_replicas`` servers and wait until all are healthy
    (if any fails, all are stopped and the error names it with its log tail)."""
    if cfg.urls:
        servers = [SGLangServer(url=url.rstrip("/")) for url in cfg.urls]
        for server in servers:
            server.wait_ready(cfg.startup_timeout_s)
        return servers
    ports = [cfg.port + i if cfg.port else free_port(cfg.host) for i in range(cfg.num_replicas)]
    servers: list[SGLangServer] = []
    try:
        for i, port in enumerate(ports):
            servers.append(SGLangServer.launch(model_path, cfg, port=port, log_path=log_dir / f"sglang-{i}-{port}.log"))
        for server in servers:
            waited = server.wait_ready(cfg.startup_timeout_s)
            log.info("sglang server %s ready after %.1f s", server.url, waited)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def _stop_all_live() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        server.stop()


atexit.register(_stop_all_live)


_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent dies
if os.getppid() != int(sys.argv[1]):  # the parent died before prctl took effect
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""
"""Run first in the server's process (then exec'd into the server, which keeps the setting): a
``preexec_fn`` would do the same but is unsafe in a process with threads (the engine has one)."""


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
