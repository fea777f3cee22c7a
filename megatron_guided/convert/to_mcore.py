"""hf-to-mcore: an HF folder (safetensors, single or sharded) → a Megatron model folder.

Output (the contract `MegatronBackend` loads): the HF folder's non-weight files (config.json,
generation config, tokenizer) at top level, `dist_ckpt/` (torch_dist, the tensors of
`{"model": GPTModel.sharded_state_dict()}`) and `conversion.json` (what was converted, how).

Rules:
- Every Megatron parameter comes from the shared table (:mod:`megatron_guided.models.qwen2`) and
  every HF tensor is used (a tied checkpoint's redundant `lm_head.weight` excepted); shapes are
  checked against the model the config describes before anything is written.
- The target layout matters for one thing in this TP/PP-agnostic format: the vocabulary is padded
  to a multiple of `make_vocab_size_divisible_by × tp` (zero rows). TP must divide the heads and the
  query groups, PP (× VPP) the layers. Megatron loads the folder at any other TP/PP too (embedding
  and output layer are `allow_shape_mismatch` tensors: extra padded rows load as zeros).
- dtype: that of the HF tensors (all floating tensors must share one, or pass `dtype`), except
  where megatron-core's own parameter is another dtype (its torch RMSNorm weights are fp32 on CPU).
- Streaming: one parameter is read (safetensors, mmap), transformed and written at a time.
- Atomic: written into `.tmp-<name>` beside the target and renamed when complete; a failure removes
  the temp folder, and a killed run's leftover is removed by the next one.
- Qwen2-VL / Qwen2.5-VL: the language model as a Qwen2 (:mod:`megatron_guided.models.qwen2_5_vl`),
  every `visual.*` tensor copied unchanged to the key `vision_model.*` (replicated, not sharded).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from megatron_guided.checkpoint.manager import TMP_PREFIX, publish_dir
from megatron_guided.convert.dist_io import save_streaming, shard_data, shard_sources
from megatron_guided.convert.guards import ConversionError, ModelArgs, check_args, check_shapes
from megatron_guided.convert.hf_io import copy_model_files, read_specs
from megatron_guided.convert.session import meta_model, single_rank
from megatron_guided.megatron.checkpoint import MODEL_DIR, model_sharded_state_dict
from megatron_guided.megatron.layout import ParallelLayout
from megatron_guided.megatron.model import SafetensorsReader, check_supported, padded_vocab_size
from megatron_guided.models.mapping import Rule, expand, megatron_to_hf
from megatron_guided.models.qwen2 import RULES, model_shape
from megatron_guided.models.qwen2_5_vl import HF_VISION_PREFIX, language_config, mg_vision_name
from megatron_guided.models.vision import is_vision_language

CONVERSION_FILE = "conversion.json"


def load_hf_config(path: Path):
    """The folder's HF config (the outer one for vision-language models), its language model checked."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise ConversionError(f"{path}: no config.json")
    config = AutoConfig.from_pretrained(str(path))
    check_supported(language_config(config))
    return config


def vision_state(specs) -> dict[str, Any]:
    """ShardedTensors (meta, replicated) for the vision tower tensors among `specs` (HF name → spec)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {name: ShardedTensor.from_rank_offsets(mg_vision_name(name), torch.empty(spec.shape, dtype=spec.dtype,
                                                                                   device="meta"), replica_id=0)
            for name, spec in specs.items() if name.startswith(HF_VISION_PREFIX)}


def check_target_layout(hf_config, layout: ParallelLayout) -> None:
    heads, groups, layers = hf_config.num_attention_heads, hf_config.num_key_value_heads, hf_config.num_hidden_layers
    if heads % layout.tp or groups % layout.tp:
        raise ConversionError(f"--tp {layout.tp} must divide num_attention_heads={heads} and "
                              f"num_key_value_heads={groups}")
    stages = layout.pp * (layout.vpp or 1)
    if layers % stages:
        raise ConversionError(f"--pp × --vpp = {stages} must divide num_hidden_layers={layers}")


def parameter_rules(names: list[str], num_layers: int) -> dict[str, tuple[Rule, int | None]]:
    """Megatron parameter name (global layer index) → its table rule and layer."""
    by_name = {}
    for rule in RULES:
        for layer in (range(num_layers) if "{i}" in rule.megatron else [None]):
            by_name[expand(rule, layer)[0]] = (rule, layer)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConversionError(f"no mapping rule for Megatron parameter(s) {missing}")
    return {n: by_name[n] for n in names}


def expected_hf_shapes(params: dict[str, Tensor], rules: dict[str, tuple[Rule, int | None]],
                       shape) -> dict[str, tuple[int, ...]]:
    """HF names and shapes the model implies: the table run backwards on the meta parameters."""
    out = {}
    for name, param in params.items():
        rule, layer = rules[name]
        out.update({k: tuple(v.shape) for k, v in megatron_to_hf(
            [{name: param}], [rule], layers=[] if layer is None else [layer], shape=shape).items()})
    return out


def check_tied_copy(reader: SafetensorsReader, hf_dir: Path) -> None:
    """Some tied checkpoints also store `lm_head.weight`; it must then be the embedding itself, or
    dropping it would lose a trained output layer."""
    pair = reader.read(["model.embed_tokens.weight", "lm_head.weight"])
    if not torch.equal(pair["model.embed_tokens.weight"], pair["lm_head.weight"]):
        raise ConversionError(f"{hf_dir}/config.json says tie_word_embeddings=true but lm_head.weight differs from "
                              "model.embed_tokens.weight: the output layer is untied; set tie_word_embeddings=false")


def source_dtype(specs, dtype: torch.dtype | None, where: Path) -> torch.dtype:
    if dtype is not None:
        return dtype
    found = sorted({str(s.dtype) for s in specs.values() if s.dtype.is_floating_point})
    if len(found) != 1:
        raise ConversionError(f"{where}: floating tensors have dtypes {found}; choose one with --dtype")
    return next(s.dtype for s in specs.values() if s.dtype.is_floating_point)


class ParameterSource:
    """Full (TP = 1) Megatron parameters computed from the HF tensors on demand, the last one kept
    (the two halves of `linear_fc1` are written one after the other)."""

    def __init__(self, reader: SafetensorsReader, rules: dict[str, tuple[Rule, int | None]], shape,
                 params: dict[str, Tensor], dtype: torch.dtype, bar: tqdm):
        self.reader, self.rules, self.shape, self.params, self.bar = reader, rules, shape, params, bar
        self.dtype = dtype
        self.last: tuple[str, Tensor] | None = None

    def __call__(self, name: str) -> Tensor:
        if self.last is None or self.last[0] != name:
            rule, layer = self.rules[name]
            _, hf_names = expand(rule, layer)
            hf = self.reader.read(list(hf_names))
            (tensor,) = rule.transform.to_megatron([hf[h] for h in hf_names], tp=1, shape=self.shape)
            # values in the model dtype, stored in the parameter's own (wider for megatron-core's fp32 norms)
            tensor = tensor.to(self.dtype).to(self.params[name].dtype)
            self.last = (name, tensor)
            self.bar.update(tensor.numel() * tensor.element_size())
        return self.last[1]


def fresh_temp(out_dir: Path) -> Path:
    """`.tmp-<name>` beside the target, emptied of any earlier interrupted attempt."""
    tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, *, layout: ParallelLayout = ParallelLayout(),
                dtype: torch.dtype | None = None, megatron_args: dict[str, Any] | None = None,
                overwrite: bool = False, progress: bool = True) -> Path:
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} exists; remove it or pass --overwrite")
    full_config = load_hf_config(hf_dir)
    hf_config = language_config(full_config)
    check_target_layout(hf_config, layout)
    args = ModelArgs.from_hf(hf_config)
    if megatron_args:
        check_args(args, megatron_args, hf_source=f"{hf_dir}/config.json", other_source="--megatron-args")
    reader = SafetensorsReader(hf_dir)
    specs = read_specs(hf_dir, reader.weight_map)
    dtype = source_dtype(specs, dtype, hf_dir)
    padded = padded_vocab_size(hf_config.vocab_size, divisible_by=layout.make_vocab_size_divisible_by, tp=layout.tp)
    shape = model_shape(hf_config, padded_vocab_size=padded)

    tmp = fresh_temp(out_dir)
    try:
        with single_rank():
            model = meta_model(hf_config, padded_vocab=padded, dtype=dtype)
            params = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, Tensor)}
            rules = parameter_rules(list(params), hf_config.num_hidden_layers)
            vision = vision_state(specs)
            if bool(vision) != is_vision_language(full_config):
                raise ConversionError(f"{hf_dir}: config.json has model_type={full_config.model_type!r} but the "
                                      f"safetensors hold {len(vision)} {HF_VISION_PREFIX}* (vision tower) tensors")
            found = {n: s.shape for n, s in specs.items() if n not in vision}
            if hf_config.tie_word_embeddings and "lm_head.weight" in found:
                check_tied_copy(reader, hf_dir)
                found.pop("lm_head.weight")
            check_shapes(found, expected_hf_shapes(params, rules, shape), where=f"{hf_dir} (safetensors)",
                         config_source=f"{hf_dir}/config.json")
            state = model_sharded_state_dict([model])
            if vision:
                state["vision"] = vision
            sources = shard_sources(state["model"])
            vision_sources = {entry.key: name for name, entry in vision.items()}
            total = sum(p.numel() * p.element_size() for p in params.values())
            total += sum(specs[name].nbytes for name in vision)
            with tqdm(total=total, unit="B", unit_scale=True, desc="hf-to-mcore", disable=not progress) as bar:
                source = ParameterSource(reader, rules, shape, params, dtype, bar)

                def produce(key: str, offset: tuple[int, ...]) -> Tensor:
                    if key in vision_sources:  # the vision tower: copied as stored
                        tensor = reader.read([vision_sources[key]])[vision_sources[key]]
                        bar.update(tensor.numel() * tensor.element_size())
                        return tensor
                    name, entry, index = sources[(key, offset)]
                    return shard_data(entry, index, source(name))

                (tmp / MODEL_DIR).mkdir()
                save_streaming(state, tmp / MODEL_DIR, produce)
        copy_model_files(hf_dir, tmp)
        record = {"direction": "hf-to-mcore", "source": str(hf_dir.resolve()), "layout": asdict(layout),
                  "padded_vocab_size": padded, "dtype": str(dtype).removeprefix("torch."), "model_args": args.to_json()}
        (tmp / CONVERSION_FILE).write_text(json.dumps(record, indent=2))
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
