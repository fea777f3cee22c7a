"""`--verify` through the command line, and the export of a MegatronBackend training checkpoint (model
trained one step at TP=2, optimizer state present) — started from a converted folder."""

from __future__ import annotations

import pytest
import torch

from megatron_guided.config import AlgorithmConfig
from megatron_guided.convert.cli import main
from megatron_guided.convert.to_hf import mcore_to_hf
from megatron_guided.convert.to_mcore import hf_to_mcore
from megatron_guided.megatron.layout import ParallelLayout
from megatron_guided.train.megatron_backend import MegatronBackend
from tests.convert.conftest import read_hf
from tests.megatron.test_megatron_backend import actor_config, make_batch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron


def test_cli_verify_prints_the_difference_and_fails_above_the_tolerance(family_dirs, tmp_path, capsys):
    code = main(["hf-to-mcore", "--hf", str(family_dirs["qwen3"]["fp32"]), "--out", str(tmp_path / "m"), "--pp", "2",
                 "--verify", "--tolerance", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and "verify (tp=1 pp=2)" in out and "FAILED" in out, out
    diff = float(out.split("max |logits_megatron - logits_hf| = ")[1].split()[0])
    assert 0 < diff < 1e-5  # fp32 rounding only: within the default tolerance (1e-4), not within 0
    assert (tmp_path / "m" / "dist_ckpt").is_dir()  # the conversion itself is kept


def test_export_of_a_training_checkpoint(family_dirs, tmp_path):
    model_dir = hf_to_mcore(family_dirs["qwen2.5"]["fp32"], tmp_path / "start", layout=ParallelLayout(tp=2),
                            progress=False)
    backend = MegatronBackend(model_path=str(model_dir), actor=actor_config(tp=2), algorithm=AlgorithmConfig(kl_coef=0.0),
                              temperature=1.0, num_mini_batches=1, total_optimizer_steps=2, max_response_length=16)
    try:
        backend.train_step(make_batch(100))
        backend.save_checkpoint(tmp_path / "global_step_1")  # dist_ckpt/ (+ optimizer), layout.json, huggingface/
    finally:
        backend.close()
    mcore_to_hf(tmp_path / "global_step_1", tmp_path / "hf", progress=False)
    exported, backend_export = read_hf(tmp_path / "hf"), read_hf(tmp_path / "global_step_1" / "huggingface")
    assert exported.keys() == backend_export.keys() == read_hf(family_dirs["qwen2.5"]["fp32"]).keys()
    assert all(torch.equal(exported[k], v) for k, v in backend_export.items())
    assert not torch.equal(exported["lm_head.weight"], read_hf(family_dirs["qwen2.5"]["fp32"])["lm_head.weight"])
