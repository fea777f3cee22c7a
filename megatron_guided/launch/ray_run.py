"""`cluster.launcher=ray`: the placement of one training run, its generation engines, and how its
Megatron ranks are started (handed to `MegatronBackend` as `start_group`).

The HF policy engine runs in one actor (`ray_engine`). SGLang engines (`worker.rollout.engine=sglang`,
a model verifier with `engine=sglang`) run one server per slot of `cluster.policy_engine` /
`cluster.verifier_engine` (`ray_sglang`); the run then goes on with a config whose `sglang.urls` name
those servers, so the policy's `SGLangEngine` (built here) and the verifier's attach to them."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

from megatron_guided.config import Config
from megatron_guided.launch.placement import plan_placement
from megatron_guided.launch.ray_cluster import RayCluster
from megatron_guided.launch.ray_engine import EngineActor, RemoteEngine
from megatron_guided.launch.ray_sglang import start_sglang_servers
from megatron_guided.launch.ray_workers import RayWorkerGroup
from megatron_guided.megatron.layout import ParallelLayout
from megatron_guided.rollout.engine import GenerationEngine


def start_on_ray(cfg: Config, *, engine_factory: Callable[[Config], GenerationEngine]
                 ) -> tuple[Config, GenerationEngine, Callable[..., RayWorkerGroup]]:
    """Start (or join) Ray, place the plan, start the engines in their slots. Returns the config the rest
    of the run builds from (the SGLang engines' `urls` filled in), the policy engine (`engine_factory(cfg)`:
    in its actor for the HF engine, here, attached to the servers, for SGLang) and the `start_group(spec)`
    that starts the ranks in theirs."""
    cl = cfg.cluster
    world_size = ParallelLayout.from_config(cfg.worker.actor.megatron).world_size
    served = cfg.sglang_engines()
    kinds = ("policy_engine", *(k for k in served if k != "policy_engine"))
    cluster = RayCluster(cl, plan_placement(cl, world_size=world_size, engines=kinds))
    try:
        if served:
            cfg = copy.deepcopy(cfg)
            served = cfg.sglang_engines()  # the copy's configs, to fill in
            sources = {"policy_engine": (cfg.worker.actor.model.model_path, "policy"),
                       "verifier_engine": (cfg.worker.rollout.verifier.model_path, "verifier")}
            urls = start_sglang_servers(
                cluster, {kind: (sources[kind][0], sg, cfg.output_dir / "sglang" / sources[kind][1])
                          for kind, (_, sg) in served.items()}, on_node_ip=bool(cl.ray_address))
            for kind, (_, sg) in served.items():
                sg.urls = urls[kind]
        if "policy_engine" in served:
            engine = engine_factory(cfg)
        else:
            (slot, *_) = cluster.plan.engines["policy_engine"]  # the HF engine: one actor
            engine = RemoteEngine(cluster.spawn(EngineActor, slot, partial(engine_factory, cfg),
                                                cl.policy_engine.cpus_per_engine, name="policy-engine"))
    except BaseException:
        cluster.close()
        raise

    def start_group(spec) -> RayWorkerGroup:
        return RayWorkerGroup(cluster, spec, threads_per_rank=cl.cpus_per_rank, start_timeout=cl.start_timeout)

    return cfg, engine, start_group
