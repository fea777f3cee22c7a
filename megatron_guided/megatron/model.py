"""A megatron-core GPTModel built from an HF config, with HF weights in and out.

Supported: Qwen2 / Qwen2.5 (qkv bias), Qwen3 (q/k RMSNorm, explicit head_dim), Llama (dense, no
attention/MLP bias), and Qwen2-VL / Qwen2.5-VL: their Qwen2 decoder with m-RoPE
(``position_embedding_type='mrope'``) and the HF vision tower beside it on the first stage
(:mod:`megatron_guided.megatron.vision`). The layer spec is Transformer Engine's when TE imports and a GPU is present
(FP8 possible), the local megatron-core spec otherwise (what runs on CPU/gloo). Names and tensor
layouts come from the shared table in :mod:`megatron_guided.models.qwen2` (the conversion tools
use the same one).

All functions that take `chunks` work on the model chunks of *this* rank (one per virtual pipeline
stage); weight loading reads only this rank's tensors from the safetensors files (mmap).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from megatron_guided.megatron.layout import ParallelLayout
from megatron_guided.models.mapping import ModelShape, hf_to_megatron, megatron_to_hf
from megatron_guided.models.qwen2 import RULES, TE_RULES, model_shape
from megatron_guided.models.qwen2_5_vl import HF_VISION_PREFIX, MG_VISION_PREFIX, hf_vision_name, language_config
from megatron_guided.models.qwen2_5_vl import mrope_section as vl_mrope_section
from megatron_guided.models.vision import is_vision_language

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")


class UnsupportedModelError(ValueError):
    pass


def te_available() -> bool:
    """Transformer Engine importable and a GPU present: use TE's fused layers (and allow FP8)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def padded_vocab_size(vocab_size: int, *, divisible_by: int, tp: int) -> int:
    """Megatron's rule: round the vocabulary up to a multiple of divisible_by × TP."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def check_supported(hf_config) -> None:
    """Refuse what the GPTModel mapping does not reproduce exactly, naming the config field."""
    kind = hf_config.model_type
    if kind not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"model_type={kind!r} is not supported by the Megatron backend "
                                    f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"rope_parameters.rope_type={rope['rope_type']!r}: only default RoPE is mapped")
    if getattr(hf_config, "use_sliding_window", False):
        raise UnsupportedModelError("use_sliding_window=true: sliding-window attention is not mapped")
    if kind == "llama" and (getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False)):
        raise UnsupportedModelError("Llama with attention_bias/mlp_bias is not mapped (o_proj/MLP biases)")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act={hf_config.hidden_act!r}: only silu (SwiGLU) is mapped")


def transformer_config(hf_config, layout: ParallelLayout, *, fp8: str | None = None, fp8_recipe: str = "delayed",
                       recompute: str | None = None, params_dtype: torch.dtype = torch.float32):
    """The megatron-core TransformerConfig equivalent to `hf_config` (exact forward on the local spec)."""
    from megatron.core.transformer import TransformerConfig

    if is_vision_language(hf_config):
        kwargs_mrope = {"mrope_section": vl_mrope_section(hf_config)}
        hf_config = language_config(hf_config)
    else:
        kwargs_mrope = {}
    check_supported(hf_config)
    shape = model_shape(hf_config)
    on_gpu = torch.cuda.is_available()
    kwargs = {}
    if recompute:  # "full" (whole layers) | "selective" (core attention only)
        kwargs = {"recompute_granularity": recompute}
        if recompute == "full":
            kwargs |= {"recompute_method": "uniform", "recompute_num_layers": 1}
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=hf_config.model_type == "qwen2",
        qk_layernorm=hf_config.model_type == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # token-budget micro-batches differ in rows and length; the interleaved (VPP) schedule cannot
        # exchange shapes (it deadlocks), so the worker pads its micro-batches to one shape instead
        variable_seq_lengths=layout.vpp is None,
        moe_token_dispatcher_type="alltoall",  # dense models; the default (allgather) refuses variable lengths
        batch_p2p_sync=on_gpu,  # CPU: no torch.cuda.synchronize between p2p ops (compat item 3)
        batch_p2p_comm=on_gpu,  # CPU: ordered p2p ops (compat item 6)
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        masked_softmax_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=on_gpu,
        fp8=fp8,
        fp8_recipe=fp8_recipe if fp8 else "delayed",
        **kwargs,
        **kwargs_mrope,
    )


def layer_spec(config, *, use_te: bool):
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")


def build_chunks(hf_config, layout: ParallelLayout, config, *, use_te: bool) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks (one per virtual pipeline stage), randomly initialised; for a
    vision-language config the first stage's chunk also holds the vision tower (`vision_model`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_guided.megatron.vision import build_vision_tower

    vl = is_vision_language(hf_config)
    full_config, hf_config = hf_config, language_config(hf_config)
    spec = layer_spec(config, use_te=use_te)
    vocab = padded_vocab_size(hf_config.vocab_size, divisible_by=layout.make_vocab_size_divisible_by, tp=layout.tp)
    chunks = []
    for vp_stage in range(layout.vpp or 1):
        vp = vp_stage if layout.vpp else None
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=vocab,
            max_sequence_length=hf_config.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            position_embedding_type="mrope" if vl else "rope", rotary_base=rope_theta(hf_config), vp_stage=vp))
        if vl and chunks[-1].pre_process:
            chunks[-1].vision_model = build_vision_tower(full_config, dtype=config.params_dtype)
    return chunks


def causal_mask(seq_len: int) -> Tensor:
    """[1, 1, S, S] bool, True where attention is masked (the future). Right padding needs no more:
    real tokens never attend to the padding after them."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)[None, None]


# -- names: this rank's modules ↔ global layer indices ------------------------------------------
def local_to_global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """`decoder.layers.{local}.…` → `decoder.layers.{global}.…` for one chunk's state-dict keys."""
    offsets = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
               for i, layer in enumerate(chunk.decoder.layers)}
    names = {}
    for key in chunk.state_dict(keep_vars=True):
        if key.endswith("._extra_state"):
            continue
        for local, glob in offsets.items():
            if key.startswith(local):
                names[key] = glob + key[len(local):]
                break
        else:
            names[key] = key
    return names


def is_vision_name(name: str) -> bool:
    return name.startswith(MG_VISION_PREFIX)


def global_layers(chunk: torch.nn.Module) -> list[int]:
    return [layer.layer_number - 1 for layer in chunk.decoder.layers]


def rules_for(use_te: bool):
    return TE_RULES if use_te else RULES


def mapping_shape(hf_config, layout: ParallelLayout) -> ModelShape:
    hf_config = language_config(hf_config)
    return model_shape(hf_config, padded_vocab_size=padded_vocab_size(
        hf_config.vocab_size, divisible_by=layout.make_vocab_size_divisible_by, tp=layout.tp))


class SafetensorsReader:
    """Lazy, read-only view of an HF folder's safetensors (single file or sharded with an index)."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = model_dir / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
            with safe_open(str(single), framework="pt") as handle:
                weight_map = {k: "model.safetensors" for k in handle.keys()}
        self.dir, self.weight_map = model_dir, weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def read(self, names: list[str]) -> dict[str, Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(str(self.dir / file), framework="pt") as handle:
                out.update({n: handle.get_tensor(n) for n in file_names})
        return out


def hf_names_for(chunk: torch.nn.Module, available: list[str], *, tied: bool) -> list[str]:
    """The HF tensors one chunk needs: its layers, plus embeddings / final norm / head by stage."""
    layers = set(global_layers(chunk))
    needed = []
    for name in available:
        parts = name.split(".")
        if name.startswith(HF_VISION_PREFIX):  # the vision tower: loaded by load_hf_weights on its own
            continue
        if len(parts) > 2 and parts[1] == "layers":
            if int(parts[2]) in layers:
                needed.append(name)
        elif name == "model.embed_tokens.weight":
            if chunk.pre_process or (chunk.post_process and tied):
                needed.append(name)
        elif chunk.post_process:  # model.norm.weight, lm_head.weight
            needed.append(name)
    return needed


@torch.no_grad()
def load_hf_weights(chunks: list[torch.nn.Module], model_dir: str | Path, hf_config, layout: ParallelLayout,
                    *, tp_rank: int, use_te: bool) -> None:
    """Copy this rank's shards of the HF checkpoint in `model_dir` into `chunks` (every parameter
    must be covered: a missing or extra tensor is an error naming it)."""
    from megatron_guided.megatron.vision import load_vision_tower

    reader = SafetensorsReader(model_dir)
    shape, rules = mapping_shape(hf_config, layout), rules_for(use_te)
    tied = bool(hf_config.tie_word_embeddings)
    for chunk in chunks:
        if hasattr(chunk, "vision_model"):
            names = [n for n in reader.keys() if n.startswith(HF_VISION_PREFIX)]
            load_vision_tower(chunk.vision_model, {n[len(HF_VISION_PREFIX):]: t for n, t in reader.read(names).items()})
        hf_state = reader.read(hf_names_for(chunk, reader.keys(), tied=tied))
        if tied and chunk.post_process and not chunk.pre_process:  # last stage's copy of the embedding
            hf_state["lm_head.weight"] = hf_state.pop("model.embed_tokens.weight")
        hf_state.pop("lm_head.weight", None) if tied and chunk.pre_process else None
        shard = hf_to_megatron(hf_state, rules, layers=global_layers(chunk), tp=layout.tp, shape=shape)[tp_rank]
        names = {k: v for k, v in local_to_global_names(chunk).items() if not is_vision_name(k)}
        params = dict(chunk.state_dict(keep_vars=True))
        missing = [local for local, glob in names.items() if glob not in shard]
        if missing:
            raise KeyError(f"{model_dir}: no HF tensor maps to Megatron parameter(s) {missing}")
        for local, glob in names.items():
            target = params[local]
            if target.shape != shard[glob].shape:
                raise ValueError(f"{glob}: checkpoint shard {tuple(shard[glob].shape)} != model {tuple(target.shape)}")
            target.copy_(shard[glob])


def chunk_state_global(chunk: torch.nn.Module) -> dict[str, Tensor]:
    """One chunk's parameters keyed by global Megatron names (TP-local tensors, detached)."""
    state = chunk.state_dict()
    return {glob: state[local].detach() for local, glob in local_to_global_names(chunk).items()}


def gather_tp(tensor: Tensor, group) -> list[Tensor]:
    """All TP shards of one parameter (every TP rank gets them)."""
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return [tensor]
    shards = [torch.empty_like(tensor) for _ in range(size)]
    torch.distributed.all_gather(shards, tensor.contiguous(), group=group)
    return shards


def iter_hf_weights(chunks: list[torch.nn.Module], hf_config, layout: ParallelLayout, *, use_te: bool,
                    bucket_bytes: int = 256 << 20) -> Iterator[dict[str, Tensor]]:
    """Buckets of full HF-named tensors, gathered over TP and PP. Collective: every rank of the
    model-parallel group must iterate it; the buckets arrive on pipeline stage 0, TP rank 0 (other
    ranks get nothing). With tied embeddings the embedding is taken from the first stage only."""
    from megatron.core import parallel_state as ps

    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    shape, rules = mapping_shape(hf_config, layout), rules_for(use_te)
    pp_ranks = torch.distributed.get_process_group_ranks(pp_group)
    skip_output = bool(hf_config.tie_word_embeddings)

    def own_buckets() -> Iterator[dict[str, Tensor]]:
        bucket, size = {}, 0
        for chunk in chunks:
            layers = global_layers(chunk)
            for name, tensor in chunk_state_global(chunk).items():
                if skip_output and name == "output_layer.weight":
                    continue
                if is_vision_name(name):  # replicated, HF layout already
                    if tp_rank == 0:
                        bucket[hf_vision_name(name)] = tensor
                        size += tensor.numel() * tensor.element_size()
                    continue
                full = gather_tp(tensor, tp_group)
                if tp_rank != 0:
                    continue
                for hf_name, hf_tensor in megatron_to_hf([{name: s} for s in full], rules, layers=layers,
                                                         shape=shape).items():
                    bucket[hf_name] = hf_tensor
                    size += hf_tensor.numel() * hf_tensor.element_size()
                if size >= bucket_bytes:
                    yield bucket
                    bucket, size = {}, 0
        if bucket:
            yield bucket

    for stage in range(len(pp_ranks)):
        if stage == pp_rank:
            for bucket in own_buckets():
                if tp_rank == 0:
                    if stage != 0:
                        torch.distributed.broadcast_object_list([bucket], src=pp_ranks[stage], group=pp_group)
                    else:
                        yield bucket
            if tp_rank == 0 and stage != 0:
                torch.distributed.broadcast_object_list([None], src=pp_ranks[stage], group=pp_group)
        elif tp_rank == 0 and stage != 0:
            while True:
                box = [None]
                torch.distributed.broadcast_object_list(box, src=pp_ranks[stage], group=pp_group)
                if box[0] is None:
                    break
                if pp_rank == 0:
                    yield box[0]
