"""Guided GRPO end to end with the tiny Qwen2.5-VL on the toy visual task (CPU): the shipped config
runs (visual step checker in the loop, images in every turn), the rollout/trainer logprob gap stays at
float rounding, and the checkpoint's huggingface/ folder loads again as a vision-language policy."""

from __future__ import annotations

import json

import pytest

from megatron_guided.config import load_config
from megatron_guided.models.vision import VisionProcessor, load_policy_model
from megatron_guided.train.main import build_trainer

pytestmark = pytest.mark.integration


def test_guided_vl_loop_runs_and_checkpoints(tiny_vl_dir, visual_data_dir, tmp_path):
    cfg = load_config([
        "config=examples/tiny_vl_cpu_guided.yaml",
        f"data.train_files={visual_data_dir / 'train.jsonl'}", f"data.val_files={visual_data_dir / 'test.jsonl'}",
        "data.rollout_batch_size=4", "data.max_response_length=24", "data.val_max_samples=4",
        "worker.actor.global_batch_size=4", f"worker.actor.model.model_path={tiny_vl_dir}", "worker.rollout.n=4",
        "worker.rollout.verifier.guide_when=always", "worker.rollout.verifier.max_tokens_per_turn=12",
        "worker.rollout.verifier.max_trajectory_tokens=160", "trainer.max_steps=2", "trainer.save_freq=2",
        "trainer.val_before_train=false", "trainer.val_freq=-1", "trainer.logger=[file]", "trainer.num_threads=1",
        f"trainer.output_dir={tmp_path / 'out'}", f"trainer.save_checkpoint_path={tmp_path / 'ckpt'}"])
    build_trainer(cfg).fit()
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "actor/rollout_logprob_abs_diff" in m]
    assert len(train) == 2
    assert all(m["actor/rollout_logprob_abs_diff"] < 1e-4 for m in train), train
    assert max(m["guided/turns_mean"] for m in train) > 1.0
    folder = tmp_path / "ckpt" / "global_step_2" / "huggingface"
    assert load_policy_model(folder).config.model_type == "qwen2_5_vl"
    assert VisionProcessor.from_pretrained(folder).image_token_id == 266
