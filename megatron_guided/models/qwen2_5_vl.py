"""Qwen2-VL / Qwen2.5-VL ↔ Megatron-Core: the language model is a Qwen2 decoder, mapped by the shared
table of :mod:`megatron_guided.models.qwen2` (HF names ``model.layers.*``, ``model.embed_tokens``,
``model.norm``, ``lm_head`` are the same as Qwen2's); the vision tower is carried as-is.

* :func:`language_config` -- the decoder's HF config as a ``Qwen2Config`` (``text_config`` with the
  outer ``tie_word_embeddings``), so every Qwen2 rule, guard and the GPTModel builder apply to it
  unchanged. The m-RoPE split of the rotary channels is :func:`mrope_section`.
* Vision weights: HF ``visual.<rest>`` ↔ Megatron ``vision_model.<rest>`` (one replicated,
  unsharded tensor each: the tower runs beside the language model on every rank, not TP-split).
"""

from __future__ import annotations

from typing import Any

from megatron_guided.models.vision import is_vision_language

__all__ = ["HF_VISION_PREFIX", "MG_VISION_PREFIX", "checkpoint_name", "hf_vision_name", "language_config",
           "mg_vision_name", "mrope_section"]

HF_VISION_PREFIX = "visual."
MG_VISION_PREFIX = "vision_model."
_NOT_COPIED = ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "layer_types")


def language_config(hf_config: Any) -> Any:
    """The decoder's config as a Qwen2 config for a Qwen2-VL-family ``hf_config``; any other config
    is returned unchanged."""
    if not is_vision_language(hf_config):
        return hf_config
    from transformers import Qwen2Config

    values = {k: v for k, v in hf_config.text_config.to_dict().items() if k not in _NOT_COPIED}
    rope = dict(values.pop("rope_parameters", None) or {})
    rope.pop("mrope_section", None)
    values["tie_word_embeddings"] = bool(hf_config.tie_word_embeddings)
    return Qwen2Config(**values, rope_parameters=rope)


def mrope_section(hf_config: Any) -> list[int]:
    """Rotary channel pairs given to the (temporal, height, width) positions; sums to head_dim / 2."""
    return list(hf_config.text_config.rope_parameters["mrope_section"])


def checkpoint_name(module_name: str) -> str:
    """A transformers 5 module's parameter name → its name in saved checkpoints (what conversion and
    the Megatron export use): ``model.language_model.X`` → ``model.X``, ``model.visual.X`` → ``visual.X``."""
    for inner, saved in (("model.language_model.", "model."), ("model.visual.", HF_VISION_PREFIX)):
        if module_name.startswith(inner):
            return saved + module_name[len(inner):]
    return module_name


def mg_vision_name(hf_name: str) -> str:
    if not hf_name.startswith(HF_VISION_PREFIX):
        raise ValueError(f"{hf_name} is not a vision tower tensor (expected the {HF_VISION_PREFIX!r} prefix)")
    return MG_VISION_PREFIX + hf_name[len(HF_VISION_PREFIX):]


def hf_vision_name(mg_name: str) -> str:
    if not mg_name.startswith(MG_VISION_PREFIX):
        raise ValueError(f"{mg_name} is not a vision tower tensor (expected the {MG_VISION_PREFIX!r} prefix)")
    return HF_VISION_PREFIX + mg_name[len(MG_VISION_PREFIX):]
