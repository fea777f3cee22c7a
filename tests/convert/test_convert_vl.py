"""Qwen2.5-VL conversion in this process: HF → Megatron (TP=2 target) → HF is bit-identical, vision
tower included (stored as replicated `vision_model.*` tensors); a config/weights mismatch about the
vision tower is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_guided.convert.dist_io import stored_tensors
from megatron_guided.convert.guards import ConversionError
from megatron_guided.convert.to_hf import mcore_to_hf
from megatron_guided.convert.to_mcore import hf_to_mcore
from megatron_guided.megatron.layout import ParallelLayout
from tests.convert.conftest import read_hf

pytest.importorskip("megatron.core")


def test_vl_round_trip_is_bit_identical(tiny_vl_dir, tmp_path):
    hf_to_mcore(tiny_vl_dir, tmp_path / "mcore", layout=ParallelLayout(tp=2), progress=False)
    stored = stored_tensors(tmp_path / "mcore" / "dist_ckpt")
    vision = [k for k in stored if k.startswith("vision_model.")]
    before = read_hf(tiny_vl_dir)
    assert len(vision) == sum(k.startswith("visual.") for k in before) > 10
    assert "embedding.word_embeddings.weight" in stored and not any(k.startswith("visual.") for k in stored)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "hf", max_shard_bytes=200_000, progress=False)
    after = read_hf(tmp_path / "hf")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and (tmp_path / "hf" / "preprocessor_config.json").is_file()


def test_vision_tower_mismatch_is_refused(tiny_vl_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_vl_dir, src)
    from safetensors.torch import load_file, save_file

    weights = {k: v for k, v in load_file(src / "model.safetensors").items() if not k.startswith("visual.")}
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model_type='qwen2_5_vl' but the safetensors hold 0 visual"):
        hf_to_mcore(src, tmp_path / "mcore", progress=False)
    assert not (tmp_path / "mcore").exists()
