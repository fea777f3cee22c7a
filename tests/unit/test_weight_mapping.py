"""The HF ↔ Megatron name table: exact round trips at TP 1/2/4 for Qwen2 (tied and untied, GQA), the
per-group QKV layout against a hand-built reference, and errors that list unmapped names."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from megatron_guided.models.mapping import hf_to_megatron, megatron_to_hf
from megatron_guided.models.qwen2 import RULES, model_shape


def hf_state(tied: bool) -> tuple[dict[str, torch.Tensor], Qwen2Config]:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=48, tie_word_embeddings=tied)
    state = Qwen2ForCausalLM(config).state_dict()
    if tied:
        state.pop("lm_head.weight", None)
    return state, config


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_exact(tp, tied):
    state, config = hf_state(tied)
    shape = model_shape(config)
    shards = hf_to_megatron(state, RULES, layers=range(2), tp=tp, shape=shape)
    assert ("output_layer.weight" in shards[0]) is not tied
    qkv = shards[0]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((8 + 2 * 4) * 4 // tp, 32)
    back = megatron_to_hf(shards, RULES, layers=range(2), shape=shape)
    assert back.keys() == state.keys()
    for name in state:
        assert torch.equal(back[name], state[name]), name


def test_qkv_rows_are_grouped_per_query_group():
    state, config = hf_state(True)
    shape = model_shape(config)  # 8 heads, 4 groups, head_dim 4: 2 q heads per group
    (mg,) = hf_to_megatron(state, RULES, layers=range(2), tp=1, shape=shape)
    q, k, v = (state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    expected = []
    for g in range(4):  # naive reference: [q heads of g; k_g; v_g]
        expected += [q[(2 * g + h) * 4 : (2 * g + h + 1) * 4] for h in range(2)]
        expected += [k[g * 4 : (g + 1) * 4], v[g * 4 : (g + 1) * 4]]
    assert torch.equal(mg["decoder.layers.0.self_attention.linear_qkv.weight"], torch.cat(expected))
    bias = mg["decoder.layers.0.self_attention.linear_qkv.bias"]
    assert bias.shape == (64,)


def test_fc1_holds_gate_then_up_per_rank():
    state, config = hf_state(True)
    shards = hf_to_megatron(state, RULES, layers=range(2), tp=2, shape=model_shape(config))
    gate, up = state["model.layers.1.mlp.gate_proj.weight"], state["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(shards[1]["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate[24:], up[24:]]))


def test_unmapped_names_are_listed():
    state, config = hf_state(True)
    state["model.layers.0.self_attn.rotary_extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match="rotary_extra"):
        hf_to_megatron(state, RULES, layers=range(2), tp=1, shape=model_shape(config))
    with pytest.raises(ValueError, match="TP=3"):
        hf_to_megatron(hf_state(True)[0], RULES, layers=range(2), tp=3, shape=model_shape(config))
