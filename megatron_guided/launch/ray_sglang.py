"""SGLang servers in the plan's engine slots: one `SGLangServerActor` per slot launches one server on
its node (`rollout.sglang.server`, unchanged: own process group, log file, death with its launcher) and
reports its URL; the driver's `SGLangEngine` attaches to those URLs.

The server gets the slot's GPUs as CUDA_VISIBLE_DEVICES: for a separate engine the GPUs Ray assigned to
the actor; a colocated engine of k GPUs holds a share of one rank's GPU only, so the driver asks Ray for
the GPUs of the k ranks' bundles (`RayCluster.bundle_gpu_ids`) and passes them in. It binds to the
node's IP when the run joins a cluster, else to `host` (127.0.0.1) on this machine. The actor stops its
server in `close()` (`RayCluster.close` calls it before killing the actors); a killed actor takes its
server with it (the server's parent-death signal).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import ray

from megatron_guided.config import SGLangConfig
from megatron_guided.launch.ray_cluster import RayCluster
from megatron_guided.rollout.sglang.server import SGLangServer, SGLangServerError
from megatron_guided.utils.net import free_port

log = logging.getLogger(__name__)


class SGLangServerActor:
    """One SGLang server (the body of a Ray actor)."""

    def __init__(self, model_path: str, cfg: SGLangConfig, *, log_dir: str, label: str, on_node_ip: bool,
                 gpu_ids: list[str] | None = None):
        gpu_ids = [str(i) for i in ray.get_gpu_ids()] if gpu_ids is None else gpu_ids
        if gpu_ids and len(gpu_ids) != cfg.tp_size:
            raise SGLangServerError(f"{label}: tp_size={cfg.tp_size} but the slot has GPUs {gpu_ids}")
        host = ray.util.get_node_ip_address() if on_node_ip else cfg.host
        env = cfg.env | ({"CUDA_VISIBLE_DEVICES": ",".join(gpu_ids)} if gpu_ids else {})
        cfg = dataclasses.replace(cfg, host=host, env=env)
        port = cfg.port or free_port(host)
        self.started = time.monotonic()
        self.server = SGLangServer.launch(model_path, cfg, port=port, log_path=Path(log_dir) / f"{label}-{port}.log")

    def wait_ready(self, timeout_s: float) -> tuple[str, int, float]:
        """(URL, server pid, seconds from launch to healthy) once the server answers /health."""
        self.server.wait_ready(timeout_s)
        return self.server.url, self.server.pid, time.monotonic() - self.started

    def close(self) -> None:
        self.server.stop()


def start_sglang_servers(cluster: RayCluster, engines: dict[str, tuple[str, SGLangConfig, Path]], *,
                         on_node_ip: bool) -> dict[str, list[str]]:
    """For each engine kind (`cluster.plan.engines` key) → (model path, its servers' config, log folder):
    one server per slot of that kind, all kinds' servers started at once. Returns each kind's URLs once
    every server is healthy (the first failure is raised, with its server's log tail)."""
    actors = []
    for kind, (model_path, cfg, log_dir) in engines.items():
        for i, slot in enumerate(cluster.plan.engines[kind]):
            colocated = 0 < slot.gpus < 1
            gpu_ids = cluster.bundle_gpu_ids(slot.group, range(slot.bundle, slot.bundle + cfg.tp_size)) \
                if colocated else None
            actor = cluster.spawn(SGLangServerActor, slot, model_path, cfg, log_dir=str(log_dir.resolve()),
                                  label=f"{kind}{i}", on_node_ip=on_node_ip, gpu_ids=gpu_ids,
                                  name=f"sglang-{kind}{i}")
            actors.append((kind, i, actor.wait_ready.remote(cfg.startup_timeout_s)))
    urls: dict[str, list[str]] = {kind: [] for kind in engines}
    for (kind, i, _), (url, pid, seconds) in zip(actors, ray.get([ready for *_, ready in actors])):
        log.info("%s %d: sglang server %s (pid %d) in its Ray actor, healthy after %.1f s", kind, i, url, pid,
                 seconds)
        urls[kind].append(url)
    return urls
