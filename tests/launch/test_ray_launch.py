"""Ray placement end to end on CPU: a private Ray instance, 2 Megatron ranks (TP=2 on gloo) as actors
and the policy engine as a third actor, all in one placement group; two guided GRPO steps give the
single-process run's losses. And a failing rank surfaces as an error naming it, never a hang."""

from __future__ import annotations

import time

import pytest

from megatron_guided.config import load_config
from megatron_guided.train.main import build_trainer
from tests.integration.test_grpo_loop import base_overrides, read_metrics

ray = pytest.importorskip("ray")
pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.megatron, pytest.mark.ray]

LOSS_TOL = 1e-6  # fp32; measured: the losses are equal to the last digit (differences 0.0)
GRAD_NORM_TOL = 1e-5


def guided_two_steps(model_dir, data_dir, tmp_path) -> list[str]:
    return base_overrides(model_dir, data_dir, tmp_path) + [
        "trainer.max_steps=2", "data.rollout_batch_size=4", "worker.actor.global_batch_size=4",
        "worker.rollout.n=4", "worker.actor.optim.lr=1e-4", "trainer.save_freq=-1",
        "worker.reward.reward_type=batch",
        "worker.reward.reward_function=examples/reward_function/guided_math.py:compute_score",
        "worker.rollout.verifier.enable=true", "worker.rollout.verifier.max_turns=2",
        "worker.rollout.verifier.max_trajectory_tokens=48", "worker.rollout.verifier.guided_fraction=0.5"]


def test_two_guided_steps_on_ray_match_single_process(tiny_model_dir, arith_data_dir, tmp_path):
    """The single-process run is TorchBackend with the engine in the trainer process."""
    single = guided_two_steps(tiny_model_dir, arith_data_dir, tmp_path / "single")
    build_trainer(load_config(single)).fit()
    expected = read_metrics(tmp_path / "single" / "out" / "metrics.jsonl")

    on_ray = guided_two_steps(tiny_model_dir, arith_data_dir, tmp_path / "ray") + [
        "worker.actor.strategy=megatron", "worker.actor.megatron.tp=2", "cluster.launcher=ray"]
    started = time.perf_counter()
    build_trainer(load_config(on_ray)).fit()
    print(f"ray run: {time.perf_counter() - started:.1f} s")
    got = read_metrics(tmp_path / "ray" / "out" / "metrics.jsonl")

    assert not ray.is_initialized()  # the run shut its private Ray instance down
    assert [m["step"] for m in got] == [1, 2]
    for want, have in zip(expected, got):
        assert have["verifier/calls"] == want["verifier/calls"] > 0  # same guided dialogues
        assert have["response_length/mean"] == want["response_length/mean"]
        for key in ("actor/loss", "actor/entropy", "reward/overall"):
            assert have[key] == pytest.approx(want[key], abs=LOSS_TOL), key
        assert have["actor/grad_norm"] == pytest.approx(want["actor/grad_norm"], abs=GRAD_NORM_TOL)
    assert (tmp_path / "ray" / "ckpt" / "global_step_2" / "dist_ckpt").is_dir()


def test_a_failing_rank_is_an_error_naming_it(tmp_path):
    """Ranks that raise while starting end the start with WorkerGroupError and the rank's traceback, and
    the private Ray instance is gone afterwards (no hang, no leftover actors)."""
    from megatron_guided.config import ActorConfig, AlgorithmConfig, ClusterConfig, MegatronConfig
    from megatron_guided.launch.placement import plan_placement
    from megatron_guided.launch.ray_cluster import RayCluster
    from megatron_guided.launch.ray_workers import RayWorkerGroup
    from megatron_guided.megatron.launcher import WorkerGroupError
    from megatron_guided.megatron.worker import WorkerSpec

    spec = WorkerSpec(model_path=str(tmp_path / "no-such-model"), actor=ActorConfig(megatron=MegatronConfig(tp=2)),
                      algorithm=AlgorithmConfig(), temperature=1.0, num_mini_batches=1, total_optimizer_steps=1,
                      max_response_length=8)
    cluster = ClusterConfig(launcher="ray")
    started = time.perf_counter()
    with pytest.raises(WorkerGroupError, match=r"Megatron rank \d failed during start-up:(.|\n)*no-such-model"):
        RayWorkerGroup(RayCluster(cluster, plan_placement(cluster, world_size=2, engines=())), spec,
                       threads_per_rank=1, start_timeout=120)
    assert time.perf_counter() - started < 60
    assert not ray.is_initialized()
