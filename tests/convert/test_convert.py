"""Conversion in this process (no Megatron ranks): HF → Megatron → HF is bit-identical for every family
and target layout, dtypes and files are kept, and bad inputs are refused before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_guided.convert import to_mcore
from megatron_guided.convert.cli import main
from megatron_guided.convert.hf_io import INDEX_FILE
from megatron_guided.convert.to_hf import mcore_to_hf
from megatron_guided.convert.to_mcore import hf_to_mcore
from megatron_guided.megatron.layout import ParallelLayout
from tests.convert.conftest import read_hf

pytest.importorskip("megatron.core")

LAYOUTS = {"qwen2": ParallelLayout(tp=2, pp=2), "qwen2.5": ParallelLayout(tp=1),
           "qwen3": ParallelLayout(tp=2), "llama": ParallelLayout(pp=2, make_vocab_size_divisible_by=64)}


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_round_trip_is_bit_identical(family_dirs, tmp_path, family):
    src = family_dirs[family]["bf16"]
    lay = LAYOUTS[family]
    args = ["--tp", str(lay.tp), "--pp", str(lay.pp), "--make-vocab-size-divisible-by",
            str(lay.make_vocab_size_divisible_by)]
    assert main(["hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "mcore"), "--no-progress", *args]) == 0
    record = json.loads((tmp_path / "mcore" / "conversion.json").read_text())
    assert record["dtype"] == "bfloat16" and record["layout"]["tp"] == lay.tp
    assert record["padded_vocab_size"] % (lay.make_vocab_size_divisible_by * lay.tp) == 0
    assert main(["mcore-to-hf", "--megatron", str(tmp_path / "mcore"), "--out", str(tmp_path / "hf"),
                 "--max-shard-size", "30KB", "--no-progress"]) == 0

    before, after = read_hf(src), read_hf(tmp_path / "hf")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == torch.bfloat16, name
        assert torch.equal(after[name], tensor), name
    index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(before) and len(set(index["weight_map"].values())) > 1
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == json.loads((src / "config.json").read_text())
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    assert not (tmp_path / "hf" / "conversion.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_dtype_cast_and_tokenizer_files(family_dirs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(family_dirs["llama"]["fp32"], src)
    (src / "tokenizer_config.json").write_text("{}")
    hf_to_mcore(src, tmp_path / "mcore", dtype=torch.bfloat16, progress=False)
    assert (tmp_path / "mcore" / "tokenizer_config.json").is_file()
    mcore_to_hf(tmp_path / "mcore", tmp_path / "hf", dtype=torch.float32, progress=False)
    before, after = read_hf(src), read_hf(tmp_path / "hf")
    for name, tensor in before.items():
        assert after[name].dtype == torch.float32 and torch.equal(after[name], tensor.bfloat16().float()), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"


def edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(("changes", "words"), [
    ({"num_key_value_heads": 4}, ["k_proj", "num_key_value_heads"]),
    ({"num_hidden_layers": 3}, ["model.layers.2", "num_hidden_layers"]),
    ({"tie_word_embeddings": True}, ["lm_head.weight", "tie_word_embeddings"]),
    ({"intermediate_size": 96}, ["gate_proj", "intermediate_size"]),
], ids=["kv-heads", "layers", "tied", "ffn"])
def test_hf_to_mcore_refuses_a_config_that_does_not_fit_the_weights(family_dirs, tmp_path, capsys, changes, words):
    src = edited_copy(family_dirs["llama"]["bf16"], tmp_path / "src", **changes)
    assert main(["hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written, no temp folder left


def test_untied_config_without_lm_head_is_refused(family_dirs, tmp_path, capsys):
    src = edited_copy(family_dirs["qwen2"]["fp32"], tmp_path / "src", tie_word_embeddings=False)
    assert main(["hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "lm_head.weight is missing" in capsys.readouterr().err


def test_megatron_args_must_agree(family_dirs, tmp_path, capsys):
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"rotary_base": 1000000, "norm_epsilon": 1e-5, "num_layers": 2}))
    assert main(["hf-to-mcore", "--hf", str(family_dirs["llama"]["bf16"]), "--out", str(tmp_path / "out"),
                 "--megatron-args", str(args), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "rotary_base" in err and "500000" in err and "rope_theta" in err and "norm_epsilon" in err
    assert "num_layers" not in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_different_hf_config(family_dirs, tmp_path, capsys):
    hf_to_mcore(family_dirs["qwen3"]["bf16"], tmp_path / "mcore", progress=False)
    other = edited_copy(family_dirs["qwen3"]["bf16"], tmp_path / "other", rms_norm_eps=1e-5)
    code = main(["mcore-to-hf", "--megatron", str(tmp_path / "mcore"), "--hf-config", str(other),
                 "--out", str(tmp_path / "hf"), "--no-progress"])
    assert code == 2
    assert "norm_epsilon" in capsys.readouterr().err
    # a config of another shape, with no stored config to compare against: the tensor shapes refuse it
    shutil.rmtree(tmp_path / "mcore" / "conversion.json", ignore_errors=True)
    (tmp_path / "mcore" / "conversion.json").unlink()
    (tmp_path / "mcore" / "config.json").unlink()
    wrong = edited_copy(family_dirs["qwen3"]["bf16"], tmp_path / "wrong", head_dim=16)
    assert main(["mcore-to-hf", "--megatron", str(tmp_path / "mcore"), "--hf-config", str(wrong / "config.json"),
                 "--out", str(tmp_path / "hf"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "linear_qkv" in err and "head_dim" in err
    assert not (tmp_path / "hf").exists()


def test_interrupted_conversion_leaves_the_previous_output(family_dirs, tmp_path, monkeypatch):
    out = tmp_path / "mcore"
    hf_to_mcore(family_dirs["qwen2"]["bf16"], out, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    calls = []

    def failing(self, name):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, name)

    original = to_mcore.ParameterSource.__call__
    monkeypatch.setattr(to_mcore.ParameterSource, "__call__", failing)
    with pytest.raises(BaseException):  # PyTorch's writer wraps it in a CheckpointException (a BaseException)
        hf_to_mcore(family_dirs["qwen2"]["bf16"], out, overwrite=True, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mcore"]
