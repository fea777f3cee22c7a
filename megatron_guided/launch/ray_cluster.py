"""A Ray session that executes a `PlacementPlan`: placement groups up, actors into their slots, all of
it torn down by `close()` (also at interpreter exit).

`cluster.ray_address=""` starts a private Ray instance on this machine sized to the plan (no cluster
setup, no dashboard); `"auto"` or `host:port` joins a running cluster, as the Slurm scripts do, and
leaves it running on close. Either way the actors import this project from the driver's checkout
(`PYTHONPATH` in the job's runtime environment), so a shared filesystem or the image is enough.
"""

from __future__ import annotations

import atexit
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from megatron_guided.config import ClusterConfig
from megatron_guided.launch.placement import PlacementPlan, Slot
from megatron_guided.megatron.launcher import WorkerGroupError

PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
CLOSE_TIMEOUT_S = 30.0
"""How long `RayCluster.close` waits for the actors' own `close()` before killing them."""
GPU_PROBE_SHARE = 0.01
"""The GPU share a `bundle_gpu_ids` probe claims (what a colocated bundle's rank and engines leave)."""


class RayCluster:
    def __init__(self, cluster: ClusterConfig, plan: PlacementPlan):
        self.plan = plan
        self.actors: list = []
        self.groups: list = []
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            runtime_env = {"env_vars": {"PYTHONPATH": PROJECT_ROOT}}
            if cluster.ray_address:
                ray.init(address=cluster.ray_address, runtime_env=runtime_env, log_to_driver=True)
            else:
                ray.init(num_cpus=int(plan.total_cpus + 0.999), num_gpus=int(plan.total_gpus + 0.999),
                         include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
        atexit.register(self.close)
        try:
            for group in plan.groups:
                bundles = [{"CPU": b.cpus, "GPU": b.gpus} if b.gpus else {"CPU": b.cpus} for b in group.bundles]
                self.groups.append(placement_group(bundles, strategy="STRICT_PACK", name=group.name))
            ready = [g.ready() for g in self.groups]
            _, waiting = ray.wait(ready, num_returns=len(ready), timeout=cluster.start_timeout)
        except BaseException:
            self.close()
            raise
        if waiting:
            missing = [plan.groups[ready.index(w)].name for w in waiting]
            self.close()
            raise WorkerGroupError(
                f"Ray could not place {missing} within cluster.start_timeout={cluster.start_timeout:.0f} s: the "
                f"plan needs {plan.total_cpus:g} CPUs and {plan.total_gpus:g} GPUs in {len(plan.groups)} node "
                f"group(s), the cluster has {ray.cluster_resources()}; check cluster.nodes / gpus_per_node")

    def spawn(self, actor_class, slot: Slot, *args, name: str, **kwargs):
        """Start `actor_class(*args, **kwargs)` (a plain class) as an actor in `slot`."""
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.groups[slot.group],
                                                    placement_group_bundle_index=slot.bundle)
        remote = ray.remote(actor_class).options(num_cpus=slot.cpus, num_gpus=slot.gpus, scheduling_strategy=strategy)
        actor = remote.remote(*args, **kwargs)
        self.actors.append((name, actor))
        return actor

    def bundle_gpu_ids(self, group: int, bundles: range) -> list[str]:
        """The GPU Ray assigned to each of `bundles` of placement group `group`, asked by a zero-CPU task
        claiming a sliver of each bundle's GPU (a colocated engine spans the GPUs of several ranks' bundles
        but holds a share of the first one only)."""
        probe = ray.remote(num_cpus=0, num_gpus=GPU_PROBE_SHARE)(_gpu_ids)
        refs = [probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.groups[group], placement_group_bundle_index=b)).remote() for b in bundles]
        return [gpu for ids in ray.get(refs) for gpu in ids]

    def close(self) -> None:
        """Let every actor with a `close()` release what it holds (an SGLang server actor stops its server),
        for at most `CLOSE_TIMEOUT_S`; then kill every actor, remove the placement groups and stop Ray if
        this session started it. Idempotent."""
        closing = [actor.close.remote() for _, actor in self.actors if hasattr(actor, "close")]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
        for _, actor in self.actors:
            ray.kill(actor, no_restart=True)
        for group in self.groups:
            remove_placement_group(group)
        self.actors, self.groups = [], []
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False


def _gpu_ids() -> list[str]:
    return [str(i) for i in ray.get_gpu_ids()]
