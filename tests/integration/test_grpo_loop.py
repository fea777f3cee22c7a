"""End-to-end GRPO on the tiny local model: the loop learns (positive control), resumes exactly,
and the shipped reward/config path runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_guided.config import load_config
from megatron_guided.train.main import build_trainer

pytestmark = pytest.mark.integration

DIGIT_REWARD = '''
def compute_score(item):
    text = item["response"]
    share = sum(ch.isdigit() for ch in text) / max(1, len(text))
    return {"overall": share, "digit_share": share}
'''


def base_overrides(model_dir: Path, data_dir: Path, tmp_path: Path) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    reward = tmp_path / "digit_reward.py"
    reward.write_text(DIGIT_REWARD)
    return [
        f"data.train_files={data_dir / 'train.jsonl'}", f"data.val_files={data_dir / 'test.jsonl'}",
        "data.max_prompt_length=64", "data.max_response_length=16", "data.rollout_batch_size=8",
        "data.val_max_samples=16", "worker.actor.global_batch_size=4",
        f"worker.actor.model.model_path={model_dir}", "worker.actor.optim.lr=3e-3",
        "worker.actor.optim.weight_decay=0.0", "worker.rollout.n=8",
        f"worker.reward.reward_function={reward}:compute_score", "worker.reward.reward_type=sequential",
        "trainer.logger=[file]", f"trainer.output_dir={tmp_path / 'out'}",
        f"trainer.save_checkpoint_path={tmp_path / 'ckpt'}", "trainer.val_before_train=false",
        "trainer.num_threads=1",
    ]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_positive_control_reward_rises(tiny_model_dir, arith_data_dir, tmp_path):
    """A trivially learnable reward (share of digits in the answer) must rise within a few steps."""
    cfg = load_config(base_overrides(tiny_model_dir, arith_data_dir, tmp_path) + ["trainer.max_steps=12"])
    build_trainer(cfg).fit()
    rewards = [m["reward/overall"] for m in read_metrics(tmp_path / "out" / "metrics.jsonl")]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15 and last > 2 * first, rewards


def test_resume_reproduces_the_next_step(tiny_model_dir, arith_data_dir, tmp_path):
    """Resuming from step 2 yields the same step-3 metrics as the uninterrupted run."""
    straight = base_overrides(tiny_model_dir, arith_data_dir, tmp_path / "a") + [
        "trainer.max_steps=3", "trainer.save_freq=2"]
    build_trainer(load_config(straight)).fit()
    uninterrupted = read_metrics(tmp_path / "a" / "out" / "metrics.jsonl")

    first_half = base_overrides(tiny_model_dir, arith_data_dir, tmp_path / "b") + [
        "trainer.max_steps=3", "trainer.save_freq=2"]
    trainer = build_trainer(load_config(first_half))
    trainer.total_steps = 2  # stop after the step-2 checkpoint, as a killed run would
    trainer.fit()
    build_trainer(load_config(first_half)).fit()  # finds global_step_2 and resumes
    resumed = read_metrics(tmp_path / "b" / "out" / "metrics.jsonl")

    assert [m["step"] for m in resumed] == [1, 2, 3]
    step3_a, step3_b = uninterrupted[2], resumed[2]
    for key in ("reward/overall", "actor/loss", "actor/grad_norm", "response_length/mean", "val/overall"):
        assert step3_a[key] == pytest.approx(step3_b[key], rel=1e-6, abs=1e-7), key


def test_shipped_math_reward_and_validation_run(tiny_model_dir, arith_data_dir, tmp_path):
    cfg = load_config(base_overrides(tiny_model_dir, arith_data_dir, tmp_path) + [
        "trainer.max_steps=1", "worker.reward.reward_type=batch",
        "worker.reward.reward_function=examples/reward_function/math.py:compute_score",
        "trainer.val_before_train=true", "trainer.val_sampled_n=2", "trainer.logger=[file,tensorboard]"])
    build_trainer(cfg).fit()
    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1]
    assert {"val/accuracy", "val_sampled/accuracy"} <= metrics[0].keys()
    assert {"reward/accuracy", "reward/format", "actor/grad_norm", "timing/gen"} <= metrics[1].keys()
    assert (tmp_path / "out" / "config.yaml").is_file()
    assert list((tmp_path / "out" / "tensorboard").iterdir())
    assert (tmp_path / "ckpt" / "global_step_1" / "huggingface" / "model.safetensors").is_file()


@pytest.mark.parametrize("variant", [
    ["algorithm.adv_estimator=rloo", "worker.actor.loss_avg_mode=seq"],
    ["algorithm.adv_estimator=dr_grpo", "worker.actor.loss_avg_mode=seq-mean-token-sum-norm"],
    ["algorithm.adv_estimator=reinforce_plus_plus", "algorithm.kl_coef=0.01", "algorithm.kl_penalty=k1"],
    ["algorithm.use_kl_loss=true", "algorithm.kl_coef=0.01", "algorithm.kl_penalty=low_var_kl"],
    ["worker.actor.loss_type=gspo", "worker.actor.clip_ratio_low=3e-4", "worker.actor.clip_ratio_high=4e-4"],
    ["worker.actor.loss_type=cispo", "worker.actor.clip_ratio_high=4.0"],
    ["algorithm.online_filtering=true", "algorithm.overlong_buffer_len=4"],
    ["worker.actor.ppo_epochs=2", "worker.actor.global_batch_size=8"],
], ids=["rloo", "dr_grpo", "reinforce++_kl_reward", "kl_loss", "gspo", "cispo", "dapo", "two_epochs"])
def test_algorithm_variants_train(tiny_model_dir, arith_data_dir, tmp_path, variant):
    """Each estimator/loss/KL/filtering path runs a real step and produces finite metrics."""
    cfg = load_config(base_overrides(tiny_model_dir, arith_data_dir, tmp_path) + ["trainer.max_steps=1"] + variant)
    build_trainer(cfg).fit()
    (metrics,) = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert metrics["actor/grad_norm"] > 0
    if "algorithm.use_kl_loss=true" in variant:
        assert "actor/kl_loss" in metrics
    if "algorithm.online_filtering=true" in variant:
        assert 0 <= metrics["batch/kept_fraction"] <= 1


@pytest.mark.parametrize("guide_when", ["always", "group_failed"])
def test_guided_grpo_with_function_verifier(tiny_model_dir, arith_data_dir, tmp_path, guide_when):
    """Guided GRPO end to end on the real tiny model: guided samples, verifier calls, cache reuse, and
    validation with and without the verifier."""
    cfg = load_config(base_overrides(tiny_model_dir, arith_data_dir, tmp_path) + [
        "trainer.max_steps=1", "worker.reward.reward_type=batch",
        "worker.reward.reward_function=examples/reward_function/guided_math.py:compute_score",
        "worker.rollout.verifier.enable=true", "worker.rollout.verifier.max_turns=3",
        "worker.rollout.verifier.max_trajectory_tokens=160", "worker.rollout.verifier.guided_fraction=0.5",
        f"worker.rollout.verifier.guide_when={guide_when}", "worker.rollout.verifier.correction_penalty=0.1",
        "trainer.val_before_train=true"])
    build_trainer(cfg).fit()
    before, after = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert {"val/accuracy", "val_guided/accuracy", "val_guided/turns_mean"} <= before.keys()
    assert before["val_guided/turns_mean"] > 1  # a random policy is corrected
    assert after["guided/fraction"] == (0.5 if guide_when == "always" else after["guided/fraction"])
    assert after["verifier/calls"] > 0 and after["verifier/failures"] == 0
    assert after["engine/prefix_reuse"] >= 0.9
    assert 0 <= after["verifier/hallucination_score"] <= 1


def test_eval_command_writes_per_sample_results(tiny_model_dir, arith_data_dir, tmp_path, capsys):
    from megatron_guided import eval as eval_cli

    eval_cli.main(base_overrides(tiny_model_dir, arith_data_dir, tmp_path) + [
        "worker.reward.reward_type=batch",
        "worker.reward.reward_function=examples/reward_function/guided_math.py:compute_score",
        "worker.rollout.verifier.enable=true", "worker.rollout.verifier.max_trajectory_tokens=160"])
    printed = capsys.readouterr().out
    assert "policy: accuracy=" in printed and "guided: accuracy=" in printed
    for mode in ("policy", "guided"):
        rows = [json.loads(line) for line in (tmp_path / "out" / f"eval_{mode}.jsonl").read_text().splitlines()]
        assert len(rows) == 16 and {"dialogue", "policy_text", "reward/accuracy", "num_turns"} <= rows[0].keys()
    guided_rows = [json.loads(line) for line in (tmp_path / "out" / "eval_guided.jsonl").read_text().splitlines()]
    assert any(r["num_corrections"] > 0 and "<|im_start|>user" in r["dialogue"] for r in guided_rows)


def test_http_verifier_in_training_never_leaks_the_key(tiny_model_dir, arith_data_dir, tmp_path, monkeypatch, caplog):
    """Guided GRPO against a real HTTP verifier on 127.0.0.1 that fails every other request: the run
    finishes, failures are counted (not treated as STOP), and the API key reaches the server but no
    file the run writes and no log line."""
    from tests.servers.fault import Action, FaultServer

    secret = "sk-test-do-not-leak-8c1f"
    monkeypatch.setenv("MY_VERIFIER_KEY", secret)
    with FaultServer(default=Action.reply("Check step 1 again.\n[SCORE] hallucination_detect=1")) as server:
        server.push(*[Action.error(500), Action.reply("###STOP###")] * 4)
        cfg = load_config(base_overrides(tiny_model_dir, arith_data_dir, tmp_path) + [
            "trainer.max_steps=1", "trainer.save_freq=1", "trainer.logger=[file,console]",
            "worker.rollout.verifier.enable=true", "worker.rollout.verifier.use_http=true",
            f"worker.rollout.verifier.base_url={server.url}", "worker.rollout.verifier.api_key_env=MY_VERIFIER_KEY",
            "worker.rollout.verifier.http_max_retries=0", "worker.rollout.verifier.http_timeout=5",
            "worker.rollout.verifier.max_turns=2", "worker.rollout.verifier.max_trajectory_tokens=160"])
        with caplog.at_level("DEBUG"):
            build_trainer(cfg).fit()
        assert any(r.headers.get("authorization") == f"Bearer {secret}" for r in server.requests)
    (metrics,) = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert metrics["verifier/failures"] >= 4 and metrics["verifier/calls"] > metrics["verifier/failures"]
    assert secret not in caplog.text
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix != ".py":
            assert secret.encode() not in path.read_bytes(), path
