"""Vision-language policies (Qwen2-VL / Qwen2.5-VL): processed image inputs and their 3-D positions.

Three things every path (data, rollout, training) shares:

* :class:`VisionInputs` -- a prompt's images, decoded once, with the image processor's output
  (``pixel_values`` [num_patches, C·T·P·P], ``image_grid_thw`` [num_images, 3]). It travels with the
  prompt to every engine request and to the trainer; nothing re-processes the images.
* :class:`VisionProcessor` -- renders a chat prompt and expands each ``<|image_pad|>`` of the
  template **once** into ``t·h·w / merge²`` copies (the number of vision embeddings the tower
  produces for that image), then tokenises. Prompt ids are final after this: engines and the
  trainer receive expanded ids and never expand again.
* :class:`MRoPE` -- the 3-D rotary positions ``[3, L]`` (temporal, height, width) of a token
  sequence, computed by the model's own ``get_rope_index`` over the *whole* sequence (prompt plus
  every later turn). Text tokens get ``p = i + δ`` on all three axes, where ``δ`` (the rope delta)
  is ``max(position) + 1 - len`` over the prefix; image tokens get their grid coordinates offset by
  the position where the image starts. The engine uses the same function for the prefill and
  ``next_position + δ`` while decoding, so training positions equal generation positions.

The processor is assembled here from the tokenizer and the image processor (no
``AutoProcessor``): transformers' Qwen2.5-VL processor also requires a video processor, which needs
torchvision; the expansion rule it applies to images is the one implemented in
:meth:`VisionProcessor.expand`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "IMAGE_PAD",
    "VISION_MODEL_TYPES",
    "MRoPE",
    "VisionInputs",
    "VisionProcessor",
    "copy_image_processor",
    "is_vision_language",
    "load_policy_model",
    "vision_forward_kwargs",
]

IMAGE_PAD = "<|image_pad|>"
VISION_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
"""HF ``model_type`` values handled as vision-language policies."""


def is_vision_language(config: Any) -> bool:
    """True for a Qwen2-VL-family HF config (the outer config, with ``vision_config``)."""
    return getattr(config, "model_type", None) in VISION_MODEL_TYPES


def load_policy_model(path: str | Path, *, config: Any = None, weights: bool = True, **kwargs: Any) -> torch.nn.Module:
    """The HF policy at ``path``: ``AutoModelForImageTextToText`` for vision-language configs,
    ``AutoModelForCausalLM`` otherwise; ``weights=False`` builds the architecture only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if config is None:
        config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    cls = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    if weights:
        return cls.from_pretrained(path, **kwargs)
    return cls.from_config(config, **kwargs)


IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


def copy_image_processor(model_dir: str | Path, out_dir: str | Path) -> None:
    """Copy the image processor's config of a vision-language model folder into ``out_dir`` (a
    checkpoint's ``huggingface/``), so that folder loads as a policy again; no-op for text models."""
    import shutil

    src = Path(model_dir) / IMAGE_PROCESSOR_FILE
    if src.is_file():
        shutil.copy2(src, Path(out_dir) / IMAGE_PROCESSOR_FILE)


@dataclass(frozen=True, kw_only=True, slots=True)
class VisionInputs:
    """A prompt's images and the image processor's output for them, in placeholder order."""

    images: tuple
    """The decoded RGB PIL images (what an SGLang engine sends as ``image_data``)."""
    pixel_values: Tensor
    """[num_patches, C·T·P·P] float: the patches of every image, image after image."""
    image_grid_thw: Tensor
    """[num_images, 3] long: each image's patch grid (t, h, w) before the spatial merge."""

    def __post_init__(self) -> None:
        if self.image_grid_thw.dim() != 2 or self.image_grid_thw.shape != (len(self.images), 3):
            raise ValueError(f"image_grid_thw must be [{len(self.images)}, 3], got {tuple(self.image_grid_thw.shape)}")
        patches = int(self.image_grid_thw.prod(-1).sum())
        if self.pixel_values.shape[0] != patches:
            raise ValueError(f"pixel_values has {self.pixel_values.shape[0]} patches, image_grid_thw says {patches}")

    @property
    def num_images(self) -> int:
        return len(self.images)

    def tokens_per_image(self, merge_size: int) -> list[int]:
        """Vision embeddings (= image tokens in the prompt) per image: t·h·w / merge²."""
        return (self.image_grid_thw.prod(-1) // merge_size**2).tolist()

    @staticmethod
    def concat(items: Sequence[VisionInputs | None]) -> tuple[Tensor, Tensor] | None:
        """(pixel_values, image_grid_thw) of several rows, row after row; None when no row has images."""
        present = [v for v in items if v is not None]
        if not present:
            return None
        return torch.cat([v.pixel_values for v in present]), torch.cat([v.image_grid_thw for v in present])


class VisionProcessor:
    """Chat template + image processor + one-time expansion of ``<|image_pad|>`` (module docstring)."""

    def __init__(self, tokenizer: Any, image_processor: Any, *, image_token: str = IMAGE_PAD) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; is this a Qwen2-VL-family tokenizer?")
        self.merge_size = int(image_processor.merge_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, tokenizer: Any = None) -> VisionProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(tokenizer, AutoImageProcessor.from_pretrained(path))

    def process_images(self, images: Sequence[Any]) -> VisionInputs:
        out = self.image_processor(images=list(images), return_tensors="pt")
        return VisionInputs(images=tuple(images), pixel_values=out["pixel_values"],
                            image_grid_thw=out["image_grid_thw"].long())

    def expand(self, text: str, vision: VisionInputs) -> str:
        """Replace the k-th ``<|image_pad|>`` of ``text`` by ``tokens_per_image[k]`` copies.

        The text must hold exactly one placeholder per image (the data loader reconciles ``<image>``
        tags with the image count before the template runs)."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != vision.num_images:
            raise ValueError(f"prompt has {len(pieces) - 1} {self.image_token} placeholders for "
                             f"{vision.num_images} images")
        counts = vision.tokens_per_image(self.merge_size)
        return pieces[0] + "".join(self.image_token * n + piece for n, piece in zip(counts, pieces[1:]))

    def encode_prompt(self, messages: list[dict], images: Sequence[Any]) -> tuple[list[int], VisionInputs]:
        """Prompt ids (generation prompt added, image tokens expanded once) and the processed images."""
        vision = self.process_images(images)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(self.expand(text, vision), add_special_tokens=False)["input_ids"]
        return [int(t) for t in ids], vision


class MRoPE:
    """3-D rotary positions of a Qwen2-VL-family model, from its own ``get_rope_index``."""

    def __init__(self, model: torch.nn.Module) -> None:
        """``model``: the ``…ForConditionalGeneration`` or its inner ``…VLModel``."""
        inner = model if hasattr(model, "get_rope_index") else getattr(model, "model", None)
        if not is_vision_language(model.config) or not hasattr(inner, "get_rope_index"):
            raise TypeError(f"MRoPE needs a Qwen2-VL-family model, got {type(model).__name__}")
        self._rope_index = inner.get_rope_index
        self.image_token_id = int(model.config.image_token_id)
        self.merge_size = int(model.config.vision_config.spatial_merge_size)

    @classmethod
    def from_config(cls, config: Any) -> MRoPE:
        """Without weights: ``get_rope_index`` reads only the config, so the model is built on the meta
        device (no memory), e.g. on a Megatron rank that holds no HF model."""
        from transformers import AutoModel

        with torch.device("meta"):
            return cls(AutoModel.from_config(config))

    def positions(self, ids: Sequence[int] | Tensor, vision: VisionInputs | None) -> tuple[Tensor, int]:
        """``([3, L] long positions, rope delta δ)`` of one unpadded sequence.

        Checks that the sequence holds exactly the image tokens ``vision`` accounts for (each image
        expanded once)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        is_image = ids == self.image_token_id
        expected = sum(vision.tokens_per_image(self.merge_size)) if vision is not None else 0
        if int(is_image.sum()) != expected:
            raise ValueError(f"sequence holds {int(is_image.sum())} image tokens, its images need {expected}")
        if vision is None:
            return torch.arange(len(ids)).expand(3, -1).clone(), 0
        with torch.no_grad():
            pos, delta = self._rope_index(ids[None], mm_token_type_ids=is_image.int()[None],
                                          image_grid_thw=vision.image_grid_thw)
        return pos[:, 0], int(delta.reshape(-1)[0])

    def batch_positions(self, input_ids: Tensor, lengths: Sequence[int],
                        vision: Sequence[VisionInputs | None]) -> Tensor:
        """[3, B, L] positions of right-padded rows (pad slots 0)."""
        out = torch.zeros(3, *input_ids.shape, dtype=torch.long)
        for i, (n, v) in enumerate(zip(lengths, vision, strict=True)):
            out[:, i, :n] = self.positions(input_ids[i, :n], v)[0]
        return out


def vision_forward_kwargs(mrope: MRoPE, input_ids: Tensor, attention_mask: Tensor,
                          vision: Sequence[VisionInputs | None]) -> dict[str, Tensor]:
    """Extra ``forward`` arguments of a VL model for right-padded rows: explicit 3-D ``position_ids``
    over each whole row and the rows' images (concatenated in row order, which is the order the model
    scatters vision embeddings into image tokens)."""
    kwargs: dict[str, Tensor] = {
        "position_ids": mrope.batch_positions(input_ids, attention_mask.sum(-1).tolist(), vision)
        .to(input_ids.device)}
    merged = VisionInputs.concat(vision)
    if merged is not None:
        kwargs["pixel_values"] = merged[0].to(input_ids.device)
        kwargs["image_grid_thw"] = merged[1].to(input_ids.device)
    return kwargs
