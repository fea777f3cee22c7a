"""Tiny, locally built Qwen2.5-VL (vision tower + decoder) with its image processor and tokenizer.

The tokenizer is :func:`megatron_guided.models.tiny.build_tokenizer`'s (one token per character,
ChatML) plus Qwen's four vision special tokens, and a chat template that renders an image part as
``<|vision_start|><|image_pad|><|vision_end|>`` (one placeholder per image; the
:class:`~megatron_guided.models.vision.VisionProcessor` expands it). The image processor is
transformers' Qwen2-VL one with small patches, so a 32×32 image is a 4×4 patch grid = 4 image tokens
after the 2×2 merge. Sizes (defaults): vision tower 2 blocks × 64 wide (the second full attention,
the first windowed), decoder as the tiny Qwen2 (128 wide, 4 layers, head_dim 32, m-RoPE sections
[4, 6, 6] = head_dim / 2).

    tok = build_vl_tokenizer(corpus)
    model = build_tiny_qwen2_5_vl(tok)
    save_tiny_vl(model, tok, build_image_processor(), "models/tiny-qwen2.5-vl")
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from tokenizers import AddedToken
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from megatron_guided.models.tiny import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, build_tokenizer, save_tiny

__all__ = ["VISION_TOKENS", "VL_CHAT_TEMPLATE", "build_image_processor", "build_tiny_qwen2_5_vl",
           "build_vl_tokenizer", "save_tiny_vl"]

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# ChatML whose content may be a string or a list of {"type": "image"} / {"type": "text"} parts.
VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_vl_tokenizer(corpus: Iterable[str]):
    """The tiny tokenizer plus :data:`VISION_TOKENS` (special) and :data:`VL_CHAT_TEMPLATE`."""
    tok = build_tokenizer(corpus)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS], special_tokens=True)
    tok.chat_template = VL_CHAT_TEMPLATE
    return tok


def build_image_processor(*, patch_size: int = 8, merge_size: int = 2, min_pixels: int | None = None,
                          max_pixels: int | None = None):
    """Qwen2-VL image processor (PIL backend when torchvision is absent) with small patches; images
    are resized to multiples of patch_size·merge_size with area in [min_pixels, max_pixels] (default
    [(patch·merge)², (16·patch)²]: 1 to 64 image tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    min_pixels = (patch_size * merge_size) ** 2 if min_pixels is None else min_pixels
    max_pixels = (16 * patch_size) ** 2 if max_pixels is None else max_pixels
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                    min_pixels=min_pixels, max_pixels=max_pixels)


def build_tiny_qwen2_5_vl(tokenizer, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                          num_kv_heads: int = 2, intermediate_size: int = 512, max_position_embeddings: int = 1024,
                          vision_hidden_size: int = 64, vision_depth: int = 2, patch_size: int = 8,
                          tie_word_embeddings: bool = True, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Randomly initialised float32 Qwen2.5-VL sized for ``tokenizer`` (eager attention, eval mode)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*VISION_TOKENS, EOS_TOKEN, PAD_TOKEN, BOS_TOKEN)}
    head_dim = hidden_size // num_heads
    if head_dim % 2 or head_dim < 8:
        raise ValueError(f"head_dim={head_dim} must be even and >= 8 for m-RoPE sections")
    half = head_dim // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # [16, 24, 24] for head_dim 128
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=ids[BOS_TOKEN], eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN]),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
            num_heads=2, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
            window_size=4 * patch_size, out_hidden_size=hidden_size, fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings, bos_token_id=ids[BOS_TOKEN], eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="eager").to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=ids[BOS_TOKEN], eos_token_id=ids[EOS_TOKEN],
                                               pad_token_id=ids[PAD_TOKEN])
    return model.eval()


def save_tiny_vl(model, tokenizer, image_processor, out_dir: str | os.PathLike) -> str:
    """A standard HF folder: :func:`~megatron_guided.models.tiny.save_tiny`'s files plus
    ``preprocessor_config.json`` (the image processor)."""
    out = save_tiny(model, tokenizer, out_dir)
    image_processor.save_pretrained(out)
    return out
