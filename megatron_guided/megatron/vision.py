"""The vision tower of a Qwen2-VL-family policy on Megatron ranks, beside the GPTModel.

The tower is transformers' own module (``visual.*`` weights, eager attention), attached to the first
pipeline stage's chunk as ``vision_model`` (so DDP, the optimizer and ``sharded_state_dict`` see it:
its tensors are saved as replicated ``vision_model.*``, the key the converter writes), and replicated
on every TP rank (it is small; each rank computes it). Its output replaces the embeddings of the image
tokens, and the language model gets the result as ``decoder_input``:

    x = embedding(input_ids)                          # [S, B, H], vocab-parallel lookup
    x[b, s] = vision(pixel_values)[k]                 # for the k-th image token in (row, position) order
    GPTModel(input_ids, position_ids [3, B, S], mask, decoder_input=x)   # m-RoPE positions

which is what the HF model does (it scatters the tower's output into the image tokens in the same
order), so the two agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from megatron_guided.models.vision import VisionInputs


def build_vision_tower(hf_config, *, dtype: torch.dtype) -> torch.nn.Module:
    """The HF vision tower for a Qwen2-VL-family config, randomly initialised (weights loaded later)."""
    from transformers import AutoModel

    config = hf_config.vision_config
    config._attn_implementation = "eager"
    return AutoModel.from_config(config).to(dtype)


@torch.no_grad()
def load_vision_tower(tower: torch.nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy ``visual.*``-stripped HF tensors into ``tower``; every tensor of the tower must be given."""
    own = tower.state_dict()
    missing, unknown = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unknown:
        raise KeyError(f"vision tower weights: missing {missing[:5]}, unknown {unknown[:5]}")
    for name, value in tensors.items():
        if own[name].shape != value.shape:
            raise ValueError(f"visual.{name}: checkpoint {tuple(value.shape)} != model {tuple(own[name].shape)}")
        own[name].copy_(value)


def vision_decoder_input(chunk: torch.nn.Module, input_ids: Tensor, vision: Sequence[VisionInputs | None],
                         *, image_token_id: int) -> Tensor:
    """``[S, B, H]`` decoder input of the first stage: token embeddings with the image tokens'
    replaced by the vision tower's output (module docstring)."""
    x = chunk.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
    merged = VisionInputs.concat(vision)
    if merged is None:
        return x
    pixel_values, grid_thw = (t.to(input_ids.device) for t in merged)
    features = chunk.vision_model(pixel_values.to(x.dtype), grid_thw=grid_thw).pooler_output  # [tokens, H]
    is_image = (input_ids == image_token_id).transpose(0, 1)[..., None]  # [S, B, 1]
    if int(is_image.sum()) != features.shape[0]:
        raise ValueError(f"{int(is_image.sum())} image tokens for {features.shape[0]} vision embeddings")
    # masked_scatter fills in memory order: go through [B, S, H] so rows come first, as in HF
    return x.transpose(0, 1).masked_scatter(is_image.transpose(0, 1), features.to(x.dtype)).transpose(0, 1)
