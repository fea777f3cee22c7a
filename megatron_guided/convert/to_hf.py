"""mcore-to-hf: a Megatron dist checkpoint (saved at any TP/PP) → an HF folder.

Accepted sources:
- a converted model folder (`config.json` + `dist_ckpt/` [+ `conversion.json`]);
- a MegatronBackend training checkpoint (`global_step_N/` with `dist_ckpt/`, `layout.json` and
  `huggingface/config.json`): its optimizer state is never read;
- a bare torch_dist folder (`metadata.json`, `.metadata`, `*.distcp`), with `--hf-config`.

The HF config is `--hf-config` (a folder or a config.json) or the one stored with the checkpoint;
when both exist they must describe the same model, and so must a Megatron-LM `args` namespace in
the checkpoint's `common.pt`, a `conversion.json`, and `--megatron-args`. Stored tensor shapes are
checked against the model the config describes before anything is written.

Output: `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` (always sharded,
`max_shard_bytes` each), config.json (its dtype field set to the written dtype), and the other
non-weight files (tokenizer, generation config) of the config's folder. dtype: `dtype`, or the
stored embedding's (megatron-core's fp32 norm weights of a bf16 model become bf16 again, exactly).
Padded vocabulary rows are dropped.

Streaming: the safetensors headers are planned from shapes alone, then one decoder layer at a time
is read from the checkpoint (only its tensors), converted and appended to the open file. Atomic as
hf-to-mcore (temp folder + rename).

Qwen2-VL / Qwen2.5-VL: the language model as a Qwen2; the stored `vision_model.*` tensors are
written back unchanged as `visual.*` (in their stored dtype), one at a time after the decoder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_guided.checkpoint.manager import publish_dir
from megatron_guided.convert.dist_io import load_entries, stored_tensors
from megatron_guided.convert.guards import (ConversionError, ModelArgs, check_args, check_shapes,
                                            megatron_lm_args)
from megatron_guided.convert.hf_io import (StreamingSafetensorsWriter, TensorSpec, copy_model_files,
                                           plan_shards)
from megatron_guided.convert.session import meta_model, single_rank
from megatron_guided.convert.to_mcore import CONVERSION_FILE, fresh_temp, load_hf_config
from megatron_guided.megatron.checkpoint import LAYOUT_FILE, MODEL_DIR
from megatron_guided.models.mapping import megatron_to_hf
from megatron_guided.models.qwen2 import RULES, model_shape
from megatron_guided.models.qwen2_5_vl import MG_VISION_PREFIX, hf_vision_name, language_config
from megatron_guided.models.vision import is_vision_language

EMBEDDING_KEY = "embedding.word_embeddings.weight"
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")
"""Checkpoint keys of model tensors (a training checkpoint also holds `optimizer.*` ones)."""


@dataclass(frozen=True)
class MegatronSource:
    dist_dir: Path
    stored_config_dir: Path | None
    record: dict[str, Any] | None
    """conversion.json of a converted folder."""


def locate(src: Path) -> MegatronSource:
    if (src / MODEL_DIR).is_dir():
        dist_dir = src / MODEL_DIR
    elif (src / "metadata.json").is_file():
        dist_dir = src
    else:
        raise ConversionError(f"{src}: neither a Megatron model folder ({MODEL_DIR}/ inside) nor a dist checkpoint "
                              "folder (metadata.json inside)")
    config_dir = next((d for d in (src, src / "huggingface") if (d / "config.json").is_file()), None)
    record_file = src / CONVERSION_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    return MegatronSource(dist_dir, config_dir, record)


def resolve_config(source: MegatronSource, hf_config: Path | None):
    """(HF config, folder its files are copied from or None, path it was read from)."""
    from transformers import AutoConfig

    if hf_config is None:
        if source.stored_config_dir is None:
            raise ConversionError(f"{source.dist_dir}: no config.json stored with the checkpoint; pass --hf-config")
        return load_hf_config(source.stored_config_dir), source.stored_config_dir, source.stored_config_dir / "config.json"
    if hf_config.is_dir():
        return load_hf_config(hf_config), hf_config, hf_config / "config.json"
    values = json.loads(hf_config.read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    return config, None, hf_config


def check_megatron_args(source: MegatronSource, hf_config, config_file: Path, megatron_args: dict | None) -> None:
    """Every statement of the architecture that comes with the checkpoint or the command line."""
    expected = ModelArgs.from_hf(hf_config)
    hf_source = str(config_file)
    if source.stored_config_dir is not None and config_file != source.stored_config_dir / "config.json":
        stored = ModelArgs.from_hf(load_hf_config(source.stored_config_dir)).to_json()
        check_args(expected, stored, hf_source=hf_source, other_source=f"{source.stored_config_dir}/config.json")
    if source.record is not None:
        check_args(expected, source.record["model_args"], hf_source=hf_source,
                   other_source=f"{source.dist_dir.parent / CONVERSION_FILE}")
    common = source.dist_dir / "common.pt"
    if common.is_file():
        state = torch.load(common, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and state.get("args") is not None:
            check_args(expected, megatron_lm_args(state["args"]), hf_source=hf_source,
                       other_source=f"Megatron-LM args in {common}")
    if megatron_args:
        check_args(expected, megatron_args, hf_source=hf_source, other_source="--megatron-args")


def unit_of(name: str) -> tuple[int, int]:
    """Write order of a parameter: embedding, decoder layers in order, then final norm and output layer."""
    if name.startswith("decoder.layers."):
        return (1, int(name.split(".")[2]))
    return (0, 0) if name.startswith("embedding.") else (2, 0)


def expected_global_shapes(model_state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    shapes = {}
    for entry in model_state.values():
        if isinstance(entry, ShardedTensor):
            shapes[entry.key] = tuple(entry.global_shape)
        elif isinstance(entry, ShardedTensorFactory):
            shapes.update({part.key: tuple(part.global_shape) for part in entry.build()})
    return shapes


def load_stored(dist_dir: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]):
    """Whole stored tensors by checkpoint key (shape, dtype from `specs`), one at a time, as stored."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for key, (shape, dtype) in specs.items():
        entry = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype), replica_id=0)
        yield key, dist_checkpointing.load({"t": entry}, str(dist_dir), validate_access_integrity=False)["t"]


def write_config(src_text: str, dst: Path, dtype: torch.dtype) -> None:
    values = json.loads(src_text)
    field = "torch_dtype" if "torch_dtype" in values and "dtype" not in values else "dtype"
    values[field] = str(dtype).removeprefix("torch.")
    dst.write_text(json.dumps(values, indent=2) + "\n")


def mcore_to_hf(src: str | Path, out_dir: str | Path, *, hf_config: str | Path | None = None,
                dtype: torch.dtype | None = None, max_shard_bytes: int = 5 << 30,
                megatron_args: dict[str, Any] | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} exists; remove it or pass --overwrite")
    source = locate(src)
    full_config, files_dir, config_file = resolve_config(source, Path(hf_config) if hf_config else None)
    config = language_config(full_config)
    check_megatron_args(source, config, config_file, megatron_args)

    tmp = fresh_temp(out_dir)
    try:
        with single_rank():
            stored = stored_tensors(source.dist_dir)
            if EMBEDDING_KEY not in stored:
                raise ConversionError(f"{source.dist_dir}: no {EMBEDDING_KEY}; not a GPT model checkpoint")
            rows, params_dtype = stored[EMBEDDING_KEY][0][0], stored[EMBEDDING_KEY][1]
            if rows < config.vocab_size:
                raise ConversionError(f"{source.dist_dir}: the embedding has {rows} rows, fewer than "
                                      f"vocab_size={config.vocab_size} of {config_file}")
            out_dtype = dtype or params_dtype
            model = meta_model(config, padded_vocab=rows, dtype=params_dtype)
            state = model.sharded_state_dict()
            check_shapes({k: v[0] for k, v in stored.items() if k.startswith(MODEL_KEY_PREFIXES)},
                         expected_global_shapes(state), where=str(source.dist_dir), config_source=str(config_file))
            shape = model_shape(config, padded_vocab_size=rows)
            params = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
            units: dict[tuple[int, int], list[str]] = {}
            for name in params:
                units.setdefault(unit_of(name), []).append(name)

            def to_hf(unit: tuple[int, int], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                layers = [unit[1]] if unit[0] == 1 else []
                return megatron_to_hf([tensors], RULES, layers=layers, shape=shape)

            vision = {key: meta for key, meta in stored.items() if key.startswith(MG_VISION_PREFIX)}
            if bool(vision) != is_vision_language(full_config):
                raise ConversionError(f"{source.dist_dir} holds {len(vision)} {MG_VISION_PREFIX}* tensors but "
                                      f"{config_file} has model_type={full_config.model_type!r}")
            plan = [TensorSpec(name, tuple(t.shape), out_dtype) for unit in sorted(units)
                    for name, t in to_hf(unit, {n: params[n] for n in units[unit]}).items()]
            plan += [TensorSpec(hf_vision_name(key), shape, dt) for key, (shape, dt) in vision.items()]
            writer = StreamingSafetensorsWriter(tmp, plan_shards(plan, max_shard_bytes))
            dtypes = {key: dt for key, (_, dt) in stored.items()}
            with tqdm(total=sum(s.nbytes for s in plan), unit="B", unit_scale=True, desc="mcore-to-hf",
                      disable=not progress) as bar:
                for unit in sorted(units):
                    loaded = load_entries({n: state[n] for n in units[unit]}, source.dist_dir, dtypes)
                    for name, tensor in to_hf(unit, loaded).items():
                        writer.write(name, tensor.to(out_dtype))
                        bar.update(tensor.numel() * out_dtype.itemsize)
                    del loaded
                for key, tensor in load_stored(source.dist_dir, vision):
                    writer.write(hf_vision_name(key), tensor)
                    bar.update(tensor.numel() * tensor.element_size())
            writer.close()
        if files_dir is not None:
            copy_model_files(files_dir, tmp)
        elif source.stored_config_dir is not None:
            copy_model_files(source.stored_config_dir, tmp)
        write_config(config_file.read_text(), tmp / "config.json", out_dtype)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def saved_layout(src: Path) -> dict[str, Any] | None:
    """The TP/PP a checkpoint was written at, when it says (layout.json or conversion.json)."""
    if (src / LAYOUT_FILE).is_file():
        return json.loads((src / LAYOUT_FILE).read_text())
    if (src / CONVERSION_FILE).is_file():
        return json.loads((src / CONVERSION_FILE).read_text())["layout"]
    return None
