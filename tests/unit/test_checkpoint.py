"""Checkpoints are atomic: a crash mid-save leaves the previous one loadable; keep_last prunes."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from megatron_guided.checkpoint.manager import CheckpointManager


def tiny_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def test_save_latest_and_keep_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    model = tiny_model()
    for step in (1, 2, 3):
        manager.save(step, write=lambda folder: model.save_pretrained(folder / "huggingface"), trainer_state={"step": step})
    assert [s for s, _ in manager.step_dirs()] == [2, 3]
    assert manager.latest().name == "global_step_3"
    assert CheckpointManager.load_trainer_state(manager.latest())["step"] == 3
    assert (manager.latest() / "huggingface" / "model.safetensors").is_file()


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=2)
    model = tiny_model()
    manager.save(1, write=lambda folder: model.save_pretrained(folder / "huggingface"), trainer_state={"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        manager.save(2, write=lambda folder: model.save_pretrained(folder / "huggingface"), trainer_state={"step": 2})
    monkeypatch.undo()
    assert manager.latest().name == "global_step_1"
    assert CheckpointManager.load_trainer_state(manager.latest())["step"] == 1
    assert [s for s, _ in manager.step_dirs()] == [1]
    manager.save(2, write=lambda folder: model.save_pretrained(folder / "huggingface"), trainer_state={"step": 2})  # cleans the half-written temp dir
    assert not list(tmp_path.glob(".tmp-*")) and manager.latest().name == "global_step_2"
