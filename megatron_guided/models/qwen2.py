"""Qwen2 / Qwen2.5 / Qwen3 / Llama (dense) ↔ Megatron-Core GPTModel (local layer spec): the name table.

Biases of q/k/v exist only for Qwen2-family models and q/k norms only for Qwen3; rules whose HF
tensors are absent are skipped. With tied embeddings HF has no `lm_head.weight` and Megatron no
`output_layer.weight`.
"""

from __future__ import annotations

from megatron_guided.models.mapping import QKV, GatedMLP, ModelShape, Replicated, Rule, Split, VocabSplit

HF_LAYER = "model.layers.{i}"
MG_LAYER = "decoder.layers.{i}"

RULES: list[Rule] = [
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VocabSplit()),
    Rule(f"{MG_LAYER}.input_layernorm.weight", (f"{HF_LAYER}.input_layernorm.weight",), Replicated()),
    Rule(f"{MG_LAYER}.self_attention.linear_qkv.weight",
         tuple(f"{HF_LAYER}.self_attn.{p}_proj.weight" for p in "qkv"), QKV()),
    Rule(f"{MG_LAYER}.self_attention.linear_qkv.bias",
         tuple(f"{HF_LAYER}.self_attn.{p}_proj.bias" for p in "qkv"), QKV()),
    Rule(f"{MG_LAYER}.self_attention.q_layernorm.weight", (f"{HF_LAYER}.self_attn.q_norm.weight",), Replicated()),
    Rule(f"{MG_LAYER}.self_attention.k_layernorm.weight", (f"{HF_LAYER}.self_attn.k_norm.weight",), Replicated()),
    Rule(f"{MG_LAYER}.self_attention.linear_proj.weight", (f"{HF_LAYER}.self_attn.o_proj.weight",), Split(1)),
    Rule(f"{MG_LAYER}.pre_mlp_layernorm.weight", (f"{HF_LAYER}.post_attention_layernorm.weight",), Replicated()),
    Rule(f"{MG_LAYER}.mlp.linear_fc1.weight",
         (f"{HF_LAYER}.mlp.gate_proj.weight", f"{HF_LAYER}.mlp.up_proj.weight"), GatedMLP()),
    Rule(f"{MG_LAYER}.mlp.linear_fc2.weight", (f"{HF_LAYER}.mlp.down_proj.weight",), Split(1)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), Replicated()),
    Rule("output_layer.weight", ("lm_head.weight",), VocabSplit()),
]


def model_shape(hf_config, *, padded_vocab_size: int | None = None) -> ModelShape:
    """Head layout and vocabulary from an HF config (head_dim defaults to hidden / heads)."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return ModelShape(num_heads=hf_config.num_attention_heads, num_query_groups=hf_config.num_key_value_heads,
                      head_dim=head_dim, vocab_size=hf_config.vocab_size,
                      padded_vocab_size=padded_vocab_size or hf_config.vocab_size)


def _te_name(megatron: str) -> str:
    """Transformer Engine's spec fuses the pre-attention and pre-MLP norms into the next linear."""
    return (megatron.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
            .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"))


TE_RULES: list[Rule] = [Rule(_te_name(r.megatron), r.hf, r.transform) for r in RULES]
"""The same table for the Transformer Engine layer spec (GPU)."""
