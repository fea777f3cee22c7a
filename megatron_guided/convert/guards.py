"""Refusals that stop a conversion before it writes anything wrong.

Silent corruption comes from a checkpoint read with the wrong architecture facts. Two kinds of
check, both ending in a :class:`ConversionError` that names the file, the field and both values:

- **Arguments.** :class:`ModelArgs` holds the facts in Megatron-LM's argument names. The HF config
  gives one set; the other side gives another: a Megatron-LM `args` namespace saved in a dist
  checkpoint's `common.pt`, the `conversion.json` / `config.json` stored with a converted model or
  training checkpoint, or `--megatron-args FILE` (JSON with Megatron-LM names, the training job's).
  Every field both sets know must agree; rope base and norm epsilon are only visible here.
- **Tensors.** Shapes in the checkpoint against the shapes the model built from the HF config
  expects (:func:`check_shapes`), with the config fields that decide each tensor's shape in the
  message; a tensor present on one side only (qkv bias, q/k norms, an untied output layer) is named
  with the field that decides whether it exists.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from megatron_guided.megatron.model import rope_theta
from megatron_guided.models.qwen2 import model_shape
from megatron_guided.models.qwen2_5_vl import language_config


class ConversionError(ValueError):
    """A conversion refused, with the reason and the fix."""


HF_FIELD = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim", "rotary_base": "rope_theta", "norm_epsilon": "rms_norm_eps",
    "untie_embeddings_and_output_weights": "tie_word_embeddings (negated)",
    "add_qkv_bias": "model_type (qwen2 has q/k/v biases)", "qk_layernorm": "model_type (qwen3 has q/k norms)",
}
"""Where each Megatron-LM argument comes from in an HF config.json."""


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    rotary_base: float
    norm_epsilon: float
    untie_embeddings_and_output_weights: bool
    add_qkv_bias: bool
    qk_layernorm: bool

    @classmethod
    def from_hf(cls, hf_config) -> ModelArgs:
        """The language model's facts (a vision-language config's decoder, see models/qwen2_5_vl.py)."""
        hf_config = language_config(hf_config)
        shape = model_shape(hf_config)
        return cls(num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
                   ffn_hidden_size=hf_config.intermediate_size, num_attention_heads=shape.num_heads,
                   num_query_groups=shape.num_query_groups, kv_channels=shape.head_dim,
                   rotary_base=rope_theta(hf_config), norm_epsilon=float(hf_config.rms_norm_eps),
                   untie_embeddings_and_output_weights=not hf_config.tie_word_embeddings,
                   add_qkv_bias=hf_config.model_type == "qwen2", qk_layernorm=hf_config.model_type == "qwen3")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def megatron_lm_args(args: Any) -> dict[str, Any]:
    """The ModelArgs fields a Megatron-LM `args` namespace (or dict of its names) states. Absent fields
    are not compared; without `group_query_attention` the query groups are the heads."""
    values = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    known = {f.name for f in fields(ModelArgs)}
    out = {k: v for k, v in values.items() if k in known and v is not None}
    if "num_query_groups" in out and values.get("group_query_attention") is False:
        out["num_query_groups"] = values.get("num_attention_heads", out["num_query_groups"])
    if "kv_channels" not in out and values.get("hidden_size") and values.get("num_attention_heads"):
        out["kv_channels"] = values["hidden_size"] // values["num_attention_heads"]
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def check_args(expected: ModelArgs, found: dict[str, Any], *, hf_source: str, other_source: str) -> None:
    """Refuse when a field `found` states differs from the HF config's."""
    wrong = []
    for name, value in found.items():
        want = getattr(expected, name)
        if not _same(want, value):
            wrong.append(f"  {name}: {hf_source} gives {want!r} (config.json `{HF_FIELD[name]}`), "
                         f"{other_source} says {value!r}")
    if wrong:
        raise ConversionError("the HF config does not describe this Megatron model:\n" + "\n".join(wrong)
                              + f"\nUse the config the checkpoint was trained with (--hf-config), or fix {other_source}.")


def read_megatron_args_file(path: str | Path) -> dict[str, Any]:
    """`--megatron-args FILE`: a JSON object with Megatron-LM argument names."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"--megatron-args {path}: {error}") from None
    unknown = sorted(set(values) - {f.name for f in fields(ModelArgs)} - {"group_query_attention"})
    if unknown:
        raise ConversionError(f"--megatron-args {path}: unknown argument(s) {unknown}; known: "
                              f"{sorted(f.name for f in fields(ModelArgs))}")
    return megatron_lm_args(values)


SHAPE_FIELDS = (
    ("linear_qkv", "num_attention_heads, num_key_value_heads, head_dim, hidden_size"),
    ("q_proj", "num_attention_heads, head_dim, hidden_size"), ("k_proj", "num_key_value_heads, head_dim"),
    ("v_proj", "num_key_value_heads, head_dim"), ("linear_proj", "num_attention_heads, head_dim, hidden_size"),
    ("o_proj", "num_attention_heads, head_dim, hidden_size"), ("layernorm", "head_dim / hidden_size"),
    ("norm", "head_dim / hidden_size"), ("fc1", "intermediate_size, hidden_size"),
    ("fc2", "intermediate_size, hidden_size"), ("mlp", "intermediate_size, hidden_size"),
    ("embed", "vocab_size, hidden_size"), ("output_layer", "vocab_size, hidden_size"),
    ("lm_head", "vocab_size, hidden_size"),
)
PRESENCE_FIELDS = (
    ("bias", "model_type (only qwen2 has q/k/v biases)"), ("q_norm", "model_type (only qwen3 has q/k norms)"),
    ("k_norm", "model_type (only qwen3 has q/k norms)"), ("q_layernorm", "model_type (only qwen3 has q/k norms)"),
    ("k_layernorm", "model_type (only qwen3 has q/k norms)"), ("output_layer", "tie_word_embeddings"),
    ("lm_head", "tie_word_embeddings"), ("layers", "num_hidden_layers"),
)


def _fields_for(name: str, table) -> str:
    return next((text for part, text in table if part in name), "the architecture fields")


def check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], *, where: str,
                 config_source: str, flexible_rows: frozenset[str] = frozenset()) -> None:
    """Every expected tensor present with the expected shape, nothing unexpected. Names in
    `flexible_rows` (padded vocabularies) may have more rows than expected, never fewer."""
    problems = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"  {name} is missing: {config_source} implies it (check {_fields_for(name, PRESENCE_FIELDS)})")
            continue
        have = tuple(found[name])
        if name in flexible_rows:
            ok = len(have) == len(shape) and have[1:] == shape[1:] and have[0] >= shape[0]
        else:
            ok = have == tuple(shape)
        if not ok:
            problems.append(f"  {name}: shape {have} in {where}, {tuple(shape)} from {config_source} "
                            f"(check {_fields_for(name, SHAPE_FIELDS)})")
    for name in sorted(set(found) - set(expected)):
        problems.append(f"  {name} is in {where} but {config_source} has no such tensor "
                        f"(check {_fields_for(name, PRESENCE_FIELDS)})")
    if problems:
        shown = problems[:12] + ([f"  … and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ConversionError(f"{where} does not match {config_source}:\n" + "\n".join(shown))
