"""Config: defaults, YAML + dotted overrides, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_guided.config import Config, ConfigError, load_config, save_resolved

REPO = Path(__file__).resolve().parents[2]


def test_defaults_validate_and_yaml_then_cli_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"worker": {"rollout": {"n": 4, "temperature": 0.7}}, "data": {"seed": 3}}))
    cfg = load_config([f"config={path}", "worker.rollout.n=6", "trainer.logger=[console]"])
    assert isinstance(cfg, Config)
    assert cfg.worker.rollout.n == 6  # CLI beats YAML
    assert cfg.worker.rollout.temperature == 0.7  # YAML beats defaults
    assert cfg.data.seed == 3 and cfg.trainer.logger == ["console"]


@pytest.mark.parametrize("args, must_contain", [
    (["worker.rollout.nn=3"], ["worker.rollout.nn", "Did you mean", "'n'"]),
    (["worker.rollout.n=abc"], ["worker.rollout.n", "Integer"]),
    (["worker.rollout.n=1"], ["worker.rollout.n=1", "n >= 2"]),
    (["data.max_prompt_length=8000"], ["worker.rollout.max_num_batched_tokens", "data.max_prompt_length"]),
    (["algorithm.adv_estimator=ppo2"], ["algorithm.adv_estimator", "grpo"]),
    (["worker.actor.loss_avg_mode=mean"], ["worker.actor.loss_avg_mode", "seq-mean-token-mean"]),
    (["data.rollout_batch_size=24", "worker.actor.global_batch_size=16"], ["multiple of", "global_batch_size"]),
    (["algorithm.kl_coef=0.1"], ["algorithm.use_kl_loss", "reinforce_plus_plus"]),
    (["worker.reward.reward_function=rewards.py"], ["path/to/file.py:function_name"]),
    (["trainer.logger=[console,slack]"], ["trainer.logger", "slack"]),
    (["rollout.n=4"], ["rollout"]),
    (["nokeyvalue"], ["key=value"]),
])
def test_bad_config_names_key_and_fix(args, must_contain):
    with pytest.raises(ConfigError) as info:
        load_config(args)
    for text in must_contain:
        assert text in str(info.value), str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("worker:\n  actor:\n    ppo_epoch: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*worker.actor.ppo_epoch.*Did you mean"):
        load_config([f"config={path}"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config([f"config={tmp_path / 'missing.yaml'}"])


def test_resolved_config_redacts_secrets(tmp_path):
    cfg = load_config([])
    cfg.worker.reward.reward_function_kwargs = {"api_key": "sk-live-123", "format_weight": 0.1}
    out = tmp_path / "config.yaml"
    save_resolved(cfg, out)
    text = out.read_text()
    assert "sk-live-123" not in text and "redacted" in text and "format_weight: 0.1" in text
    assert yaml.safe_load(text)["worker"]["rollout"]["n"] == cfg.worker.rollout.n
    assert yaml.safe_load(text)["worker"]["rollout"]["verifier"]["stop_token"] == "###STOP###"  # not a secret


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.yaml")))
def test_every_shipped_example_config_loads_and_validates(example):
    """A key renamed or a check added must not leave an example behind (SFT recipes use their schema)."""
    from megatron_guided.sft import SFTConfig, validate_sft

    path = f"config={REPO / 'examples' / example}"
    if example.startswith("sft_"):
        load_config([path], schema=SFTConfig, check=validate_sft)
    else:
        load_config([path])
