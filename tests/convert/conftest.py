"""Tiny random models of each supported family, saved as HF folders (fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch

FAMILIES = ("qwen2", "qwen2.5", "qwen3", "llama")


def tiny_model(family: str):
    """2 layers, hidden 64, 4 heads / 2 KV groups; each family's own features: Qwen2 tied with q/k/v
    biases; Qwen2.5 untied, rope base 1e6, vocab 100 (padded on import); Qwen3 explicit head_dim 32
    (≠ hidden / heads) and q/k norms; Llama untied, rope base 5e5."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=128, initializer_range=0.2)
    config = {
        "qwen2": lambda: Qwen2Config(vocab_size=64, tie_word_embeddings=True, **common),
        "qwen2.5": lambda: Qwen2Config(vocab_size=100, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6,
                                       **common),
        "qwen3": lambda: Qwen3Config(vocab_size=96, tie_word_embeddings=True, head_dim=32, **common),
        "llama": lambda: LlamaConfig(vocab_size=80, tie_word_embeddings=False, rope_theta=5e5, **common),
    }[family]()
    torch.manual_seed(FAMILIES.index(family))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # HF zero-initialises norms and biases; random values make the mapping checks sharper
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """family → {"fp32": dir, "bf16": dir}; the bf16 Qwen2 is saved sharded (index + 2+ files)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        model = tiny_model(family)
        fp32, bf16 = root / f"{family}-fp32", root / f"{family}-bf16"
        model.save_pretrained(fp32)
        model.to(torch.bfloat16).save_pretrained(bf16, max_shard_size="40KB" if family == "qwen2" else "50GB")
        out[family] = {"fp32": fp32, "bf16": bf16}
    return out


def read_hf(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
