"""The placement plan as data: trainer ranks fill their nodes in order with TP groups inside a node,
colocated engines share the ranks' bundles, separate engines get whole nodes; config checks name keys."""

from __future__ import annotations

import re

import pytest

from megatron_guided.config import ConfigError, load_config
from megatron_guided.launch.placement import COLOCATED_GPU_SHARE, plan_placement


def cluster_of(*overrides: str):
    return load_config(["worker.actor.strategy=megatron", *overrides]).cluster


def test_72b_layout_four_trainer_nodes_three_policy_nodes_one_verifier_node():
    cfg = load_config(["config=examples/qwen2_5_72b_guided_grpo.yaml"])
    plan = plan_placement(cfg.cluster, world_size=32, engines=("policy_engine", "verifier_engine"))
    names = [g.name for g in plan.groups]
    assert names == ["trainer-node0", "trainer-node1", "trainer-node2", "trainer-node3",
                     "policy_engine-node4", "policy_engine-node5", "policy_engine-node6", "verifier_engine-node7"]
    assert all(len(g.bundles) == 8 and all(b.gpus == 1 for b in g.bundles) for g in plan.groups[:4])
    assert [(s.group, s.bundle) for s in plan.ranks[7:10]] == [(0, 7), (1, 0), (1, 1)]  # rank → node, local rank
    assert all(s.gpus == 1.0 for s in plan.ranks)
    assert len(plan.engines["policy_engine"]) == 6 and plan.engines["policy_engine"][0].gpus == 4  # TP4 engines
    assert len(plan.engines["verifier_engine"]) == 8  # one 7B engine per GPU
    assert plan.total_gpus == 64


def test_colocated_engines_share_the_ranks_bundles():
    cl = cluster_of("cluster.gpus_per_node=8", "worker.actor.megatron.tp=2", "worker.actor.megatron.dp=4",
                    "cluster.policy_engine.gpus_per_engine=2")
    plan = plan_placement(cl, world_size=8)
    (node,) = plan.groups
    assert [(s.group, s.bundle) for s in plan.engines["policy_engine"]] == [(0, 0), (0, 2), (0, 4), (0, 6)]
    assert node.bundles[0].cpus == 2 and node.bundles[1].cpus == 1  # rank + engine CPUs in the engine's bundle
    assert plan.ranks[0].gpus + plan.engines["policy_engine"][0].gpus == 1.0
    assert plan.engines["policy_engine"][0].gpus == COLOCATED_GPU_SHARE


def test_cpu_plan_is_one_node_with_one_engine():
    plan = plan_placement(cluster_of("worker.actor.megatron.tp=2"), world_size=2)
    assert len(plan.groups) == 1 and plan.total_cpus == 3 and plan.total_gpus == 0
    assert [s.bundle for s in plan.ranks] == [0, 1] and len(plan.engines["policy_engine"]) == 1


@pytest.mark.parametrize("overrides, key", [
    (["cluster.gpus_per_node=8", "worker.actor.megatron.tp=2"], "tp·pp·cp·dp = 2 ranks"),
    (["cluster.gpus_per_node=4", "worker.actor.megatron.tp=8", "cluster.nodes=2"], "megatron.tp=8 must divide"),
    (["cluster.policy_engine.placement=separate"], "cluster.policy_engine.nodes=0"),
    (["cluster.policy_engine.placement=separate", "cluster.policy_engine.nodes=1"], "leaves no node"),
    (["cluster.gpus_per_node=8", "worker.actor.megatron.dp=8", "cluster.policy_engine.gpus_per_engine=3"],
     "gpus_per_engine=3 must divide"),
    (["cluster.launcher=slurm"], "cluster.launcher"),
])
def test_cluster_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("·", ".").replace("(", r"\(")):
        load_config(["worker.actor.strategy=megatron", *overrides])


VERIFIER_ON_SGLANG = ["worker.rollout.verifier.enable=true", "worker.rollout.verifier.type=model",
                      "worker.rollout.verifier.model_path=m", "worker.rollout.verifier.engine=sglang"]


@pytest.mark.parametrize("overrides, message", [
    (["worker.rollout.sglang.tp_size=2"],
     "worker.rollout.sglang.tp_size=2 must equal cluster.policy_engine.gpus_per_engine=1"),
    ([*VERIFIER_ON_SGLANG, "cluster.verifier_engine.gpus_per_engine=2"],
     "worker.rollout.verifier.sglang.tp_size=1 must equal cluster.verifier_engine.gpus_per_engine=2"),
    (["worker.rollout.sglang.urls=[http://h:1]"], "leave worker.rollout.sglang.urls empty"),
    (["worker.rollout.sglang.num_replicas=2"], "the cluster.policy_engine slots"),
])
def test_sglang_servers_on_ray_fit_their_slots(overrides, message):
    """Under Ray each engine slot runs one SGLang server over the slot's GPUs."""
    args = ["worker.actor.strategy=megatron", "cluster.launcher=ray", "worker.rollout.engine=sglang", *overrides]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(args)
    load_config([a for a in args if a != "cluster.launcher=ray"])  # the local launcher starts them itself


def test_the_example_configs_serve_their_engines_from_their_slots():
    for name in ("7b", "32b", "72b"):
        cfg = load_config([f"config=examples/qwen2_5_{name}_guided_grpo.yaml"])
        assert set(cfg.sglang_engines()) == {"policy_engine", "verifier_engine"}


def test_ray_launcher_needs_the_megatron_strategy():
    with pytest.raises(ConfigError, match="worker.actor.strategy=megatron"):
        load_config(["cluster.launcher=ray"])
