"""Where every actor of a run goes: trainer ranks and generation engines on nodes, as data.

`plan_placement` turns `cluster.*` and the Megatron world size into Ray placement groups (one per
node, `STRICT_PACK`, so a node's bundles are never split) and a slot for each actor. It is pure, so
the multi-node layouts are tested without a cluster; `launch.ray_cluster` only executes a plan.

Layout (gpus_per_node = G > 0):

    node 0 … T-1            trainer: one bundle {CPU: cpus_per_rank, GPU: 1} per rank, rank r on
                            node r // G, local rank r % G (a TP group never leaves its node)
                            colocated engines: engine e shares the GPUs of ranks e·k … e·k+k-1
                            (k = gpus_per_engine) and sits in its first bundle
    node T …                each separately placed engine kind: `nodes` nodes, one bundle
                            {CPU: cpus_per_engine, GPU: k} per engine

Colocated actors split their bundle's GPU (rank `1 - COLOCATED_GPU_SHARE`, engine
`COLOCATED_GPU_SHARE`): Ray then schedules both onto the same device, and the two take turns using it
(the engine releases its memory during the update). On CPU (G = 0) there is one trainer node and one
engine per colocated kind, in the bundle of rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_guided.config import ClusterConfig, EnginePlacementConfig

COLOCATED_GPU_SHARE = 0.25
"""The fraction of a colocated bundle's GPU an engine actor claims (the rank claims the rest)."""


@dataclass(frozen=True, kw_only=True)
class Bundle:
    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True, kw_only=True)
class NodeGroup:
    """One Ray placement group: a node's bundles (`STRICT_PACK`)."""

    name: str
    bundles: tuple[Bundle, ...]


@dataclass(frozen=True, kw_only=True)
class Slot:
    """One actor: the placement group and bundle it runs in and the resources it claims there."""

    group: int
    bundle: int
    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True, kw_only=True)
class PlacementPlan:
    groups: tuple[NodeGroup, ...]
    ranks: tuple[Slot, ...]
    """Trainer rank r runs in ranks[r]; its local rank is ranks[r].bundle."""
    engines: dict[str, tuple[Slot, ...]] = field(default_factory=dict)
    """Engine kind (policy_engine, verifier_engine) → one slot per engine."""

    @property
    def total_cpus(self) -> float:
        return sum(b.cpus for g in self.groups for b in g.bundles)

    @property
    def total_gpus(self) -> float:
        return sum(b.gpus for g in self.groups for b in g.bundles)


def plan_placement(cluster: ClusterConfig, *, world_size: int, engines: tuple[str, ...] = ("policy_engine",)
                   ) -> PlacementPlan:
    """The plan for `world_size` trainer ranks and the engine kinds named in `engines` (attributes of
    `cluster`: policy_engine, verifier_engine)."""
    gpus = cluster.gpus_per_node
    per_node = gpus or world_size
    trainer_nodes = -(-world_size // per_node)
    rank_gpu = 1.0 if gpus else 0.0
    colocated = [k for k in engines if getattr(cluster, k).placement == "colocate"]
    if gpus and colocated:
        rank_gpu = 1.0 - COLOCATED_GPU_SHARE * len(colocated)

    # trainer nodes: one bundle per rank, grown by the colocated engines' CPUs
    bundles = [[Bundle(cpus=cluster.cpus_per_rank, gpus=1.0 if gpus else 0.0)
                for _ in range(min(per_node, world_size - n * per_node))] for n in range(trainer_nodes)]
    ranks = tuple(Slot(group=r // per_node, bundle=r % per_node, cpus=cluster.cpus_per_rank, gpus=rank_gpu)
                  for r in range(world_size))
    engine_slots: dict[str, tuple[Slot, ...]] = {}
    for kind in colocated:
        engine: EnginePlacementConfig = getattr(cluster, kind)
        k = engine.gpus_per_engine if gpus else world_size  # CPU: one engine
        slots = []
        for first in range(0, world_size, k):
            group, index = first // per_node, first % per_node
            old = bundles[group][index]
            bundles[group][index] = Bundle(cpus=old.cpus + engine.cpus_per_engine, gpus=old.gpus)
            slots.append(Slot(group=group, bundle=index, cpus=engine.cpus_per_engine,
                              gpus=COLOCATED_GPU_SHARE if gpus else 0.0))
        engine_slots[kind] = tuple(slots)
    groups = [NodeGroup(name=f"trainer-node{n}", bundles=tuple(b)) for n, b in enumerate(bundles)]

    # engines on nodes of their own
    for kind in engines:
        engine = getattr(cluster, kind)
        if engine.placement != "separate":
            continue
        k = engine.gpus_per_engine
        per_engine_node = gpus // k if gpus else 1
        slots = []
        for _ in range(engine.nodes):
            groups.append(NodeGroup(name=f"{kind}-node{len(groups)}",
                                    bundles=tuple(Bundle(cpus=engine.cpus_per_engine, gpus=k if gpus else 0)
                                                  for _ in range(per_engine_node))))
            slots += [Slot(group=len(groups) - 1, bundle=i, cpus=engine.cpus_per_engine, gpus=k if gpus else 0)
                      for i in range(per_engine_node)]
        engine_slots[kind] = tuple(slots)
    return PlacementPlan(groups=tuple(groups), ranks=ranks, engines=engine_slots)
