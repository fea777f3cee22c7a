"""`cluster.launcher=ray`: the placement of one training run, its policy engine actor, and how its
Megatron ranks are started (handed to `MegatronBackend` as `start_group`)."""

from __future__ import annotations

from collections.abc import Callable

from megatron_guided.config import Config
from megatron_guided.launch.placement import plan_placement
from megatron_guided.launch.ray_cluster import RayCluster
from megatron_guided.launch.ray_engine import EngineActor, RemoteEngine
from megatron_guided.launch.ray_workers import RayWorkerGroup
from megatron_guided.megatron.layout import ParallelLayout
from megatron_guided.rollout.engine import GenerationEngine


def start_on_ray(cfg: Config, *, engine_factory: Callable[[], GenerationEngine]
                 ) -> tuple[RemoteEngine, Callable[..., RayWorkerGroup]]:
    """Start (or join) Ray, place the plan, start the policy engine from `engine_factory` in its slot.
    Returns the engine and the `start_group(spec)` that starts the ranks in theirs."""
    cl = cfg.cluster
    world_size = ParallelLayout.from_config(cfg.worker.actor.megatron).world_size
    cluster = RayCluster(cl, plan_placement(cl, world_size=world_size))
    try:
        (slot, *_) = cluster.plan.engines["policy_engine"]  # the HF engine: one; SGLang (issue 7): one per slot
        engine = RemoteEngine(cluster.spawn(EngineActor, slot, engine_factory, cl.policy_engine.cpus_per_engine,
                                            name="policy-engine"))
    except BaseException:
        cluster.close()
        raise

    def start_group(spec) -> RayWorkerGroup:
        return RayWorkerGroup(cluster, spec, threads_per_rank=cl.cpus_per_rank, start_timeout=cl.start_timeout)

    return engine, start_group
