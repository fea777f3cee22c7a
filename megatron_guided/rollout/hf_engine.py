"""In-process generation engine on a transformers causal LM (the CPU / tiny-model / test backend).

``HFEngine`` implements :class:`~megatron_guided.rollout.engine.GenerationEngine` with a hand-written
decode loop over ``model(input_ids, attention_mask, position_ids, cache, use_cache=True)`` (no
``model.generate``), with:

* **Continuous batching.** Requests are admitted into a running batch of at most ``max_batch_size``
  rows (and ``max_batch_tokens`` KV slots when set). Finished rows are compacted out of the batch and,
  while requests are pending, freed rows are refilled by prefilling the newcomers separately and merging
  them into the running batch.
* **Per-row sampling** (temperature / top-k / top-p / greedy) with **per-request seeds**: each row
  pre-draws its uniforms from its own ``torch.Generator`` and samples by inverse CDF, so a seeded
  request gives the same tokens whatever else is in the batch and wherever it sits.
* **Session KV reuse** across turns (see "Cache layout" below).

Cache layout
------------
The engine owns the KV memory: per layer a buffer ``[rows, kv_heads, capacity, head_dim]`` of which the
first ``width`` slots are in use, plus a boolean ``valid[rows, width]`` marking real tokens. A row looks
like ``[pad][session-cached KV][pad][prompt suffix][generated ...]``: left padding aligns rows, and a
second hole separates the cached prefix (which may be shorter than the longest one in the batch) from the
right-aligned freshly prefilled suffix. Attention gets an explicit 4-D additive mask (0 for real slots,
``finfo.min`` for holes; causal by slot index in prefill, pad queries attend to themselves so no row of
the softmax is empty) and explicit ``position_ids`` that count only real tokens. RoPE is applied before
caching, so cached keys keep their absolute positions and can be spliced anywhere. Holes are zero-filled
(finite) so masked products never produce NaN.

When a session row finishes, its K/V over its real slots (prompt + generated tokens except the last one,
which was never fed) is copied out with the ids it covers. A later request with that ``session_id``
reuses the longest common prefix (capped at ``len(prompt_ids) - 1``: at least one token is fed to get
logits) and prefills only the rest.

Only full-attention decoder stacks are supported (e.g. Qwen2 / Llama without sliding windows); the mask
is passed as a prepared 4-D float tensor, which the ``eager`` and ``sdpa`` attention paths accept.

Vision-language models (Qwen2-VL family)
----------------------------------------
A request's ``vision`` inputs (processed once by the data loader; the prompt ids already hold each
image's tokens) are fed with the prefill that contains their image tokens: ``pixel_values`` of those
rows, in row order, go to the model, which scatters the vision embeddings into the image tokens.
Positions are m-RoPE: the prefill gets ``[3, rows, suffix]`` positions sliced from
:class:`~megatron_guided.models.vision.MRoPE` over the row's whole prompt, and decoding feeds
``next_position + δ`` (the row's rope delta). A session cache never ends inside the images: when
the reusable prefix would stop before a row's last image token, the row is prefilled from its first
image token on. The image/video placeholder tokens are never sampled (a generated one would be read
as an image position in the next turn): they are dropped from the sampling distribution like a top-k
truncation, and reported logprobs stay those of the full distribution.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from megatron_guided.models.qwen2_5_vl import checkpoint_name
from megatron_guided.models.vision import MRoPE, VisionInputs, is_vision_language
from megatron_guided.rollout.engine import (
    Completion,
    FinishReason,
    GenerationRequest,
    SamplingParams,
)

__all__ = ["HFEngine"]


# ----------------------------------------------------------------------------------------------------------
# KV storage handed to the model
# ----------------------------------------------------------------------------------------------------------
class _BufferLayer(DynamicLayer):
    """A cache layer writing into an engine-owned preallocated buffer (no per-step ``torch.cat``).

    Either built from existing buffers (``kbuf``/``vbuf``) or lazily allocated on the first ``update``
    with ``rows x capacity`` slots, the first ``length`` of which are taken from ``prefix`` (or
    zero-filled when ``prefix`` is None).
    """

    def __init__(
        self,
        *,
        kbuf: torch.Tensor | None = None,
        vbuf: torch.Tensor | None = None,
        length: int = 0,
        capacity: int = 0,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.kbuf = kbuf
        self.vbuf = vbuf
        self.length = length
        self.capacity = capacity if kbuf is None else kbuf.shape[2]
        self.prefix = prefix
        if kbuf is not None:
            self.device = kbuf.device
            self.is_initialized = True
            self.keys = kbuf[:, :, :length]
            self.values = vbuf[:, :, :length]

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, dk = key_states.shape
        dv = value_states.shape[-1]
        self.kbuf = key_states.new_empty(b, h, self.capacity, dk)
        self.vbuf = value_states.new_empty(b, h, self.capacity, dv)
        if self.length:
            if self.prefix is None:
                self.kbuf[:, :, : self.length].zero_()
                self.vbuf[:, :, : self.length].zero_()
            else:
                self.kbuf[:, :, : self.length].copy_(self.prefix[0])
                self.vbuf[:, :, : self.length].copy_(self.prefix[1])
        self.prefix = None
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kbuf is None:
            self._allocate(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.kbuf.shape[2]:  # only if a caller under-reserved; amortised growth
            self._grow(max(end, 2 * self.kbuf.shape[2]))
        self.kbuf[:, :, self.length : end] = key_states
        self.vbuf[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.kbuf[:, :, :end]
        self.values = self.vbuf[:, :, :end]
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        b, h, _, dk = self.kbuf.shape
        k = self.kbuf.new_empty(b, h, capacity, dk)
        v = self.vbuf.new_empty(b, h, capacity, self.vbuf.shape[-1])
        k[:, :, : self.length] = self.kbuf[:, :, : self.length]
        v[:, :, : self.length] = self.vbuf[:, :, : self.length]
        self.kbuf, self.vbuf = k, v

    def get_seq_length(self) -> int:
        return self.length


class _EngineCache(Cache):
    def __init__(self, layers: list[_BufferLayer]) -> None:
        super().__init__(layers=layers)


# ----------------------------------------------------------------------------------------------------------
# Bookkeeping
# ----------------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Session:
    ids: list[int]  # tokens covered by kv
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [kv_heads, len(ids), head_dim]


@dataclass(slots=True)
class _Row:
    index: int  # position in the generate() request list
    prompt_ids: list[int]
    sampling: SamplingParams
    session_id: str | None
    seed: int
    cached: int = 0  # prompt tokens served from a session cache
    prefix: _Session | None = None  # session cache used at admission (dropped after prefill)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None
    emitted: bool = False
    stop_window: int = 0
    vision: VisionInputs | None = None
    positions: torch.Tensor | None = None  # [3, len(prompt_ids)] m-RoPE positions (vision-language models)
    rope_delta: int = 0


@dataclass(slots=True)
class _Batch:
    rows: list[_Row]
    kbufs: list[torch.Tensor]  # per layer [B, H, capacity, D]
    vbufs: list[torch.Tensor]
    width: int  # used KV slots
    valid: torch.Tensor  # [B, capacity] bool
    addmask: torch.Tensor  # [B, capacity] model dtype: 0 real / finfo.min hole
    next_pos: torch.Tensor  # [B] long: position of the pending token
    rope_delta: torch.Tensor  # [B] long: m-RoPE delta added to next_pos (0 for text-only models)
    last: torch.Tensor  # [B] long: sampled, not yet fed token
    step: torch.Tensor  # [B] long: number of tokens generated so far
    temp: torch.Tensor  # [B] float32, 1.0 for greedy rows
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] long (vocab size when off)
    top_p: torch.Tensor  # [B] float32
    uniforms: torch.Tensor  # [B, max_new] float32 pre-drawn per-row uniforms

    @property
    def size(self) -> int:
        return len(self.rows)


def _first_param(model: torch.nn.Module) -> torch.Tensor:
    return next(model.parameters())


class HFEngine:
    """``GenerationEngine`` over an in-process transformers causal LM.

    Args:
        model: a transformers causal LM (``forward(input_ids, attention_mask, position_ids, cache /
            past_key_values, use_cache, logits_to_keep)``), full attention only. Put in eval mode.
        eos_token_ids: ids that end a sequence; default from ``model.generation_config`` /
            ``model.config`` ``eos_token_id``.
        pad_token_id: id fed at padded slots (its value never matters, they are masked); default
            ``config.pad_token_id`` or 0.
        decode: ``ids -> str`` used only for stop strings. Alternatively pass ``tokenizer`` (its
            ``decode`` is used).
        max_batch_size: maximum number of rows decoded together.
        max_batch_tokens: optional cap on the KV slots of the running batch (sum over rows of
            prompt length + max_new_tokens); at least one request is always admitted.
        seed: seed of the engine generator that draws seeds for requests with ``seed=None``.
        refill_fraction: refill the running batch with pending requests once at least this fraction of
            ``max_batch_size`` rows is free (or all pending requests fit); each refill is one extra
            prefill + merge.
        compact_fraction: finished rows stay in the batch (ignored) until they are at least this
            fraction of it; then they are compacted out (one copy of the KV buffers).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_ids: Iterable[int] | int | None = None,
        pad_token_id: int | None = None,
        decode: Callable[[list[int]], str] | None = None,
        tokenizer: Any = None,
        max_batch_size: int = 256,
        max_batch_tokens: int | None = None,
        seed: int = 0,
        refill_fraction: float = 0.25,
        compact_fraction: float = 0.25,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
        if not 0.0 < refill_fraction <= 1.0:
            raise ValueError(f"refill_fraction must be in (0, 1], got {refill_fraction}")
        if not 0.0 < compact_fraction <= 1.0:
            raise ValueError(f"compact_fraction must be in (0, 1], got {compact_fraction}")
        self.model = model.eval()
        self.mrope = MRoPE(model) if is_vision_language(model.config) else None
        self.banned = (torch.tensor([model.config.image_token_id, model.config.video_token_id],
                                    device=_first_param(model).device) if self.mrope is not None else None)
        config = model.config.get_text_config()
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(f"HFEngine supports full-attention models only, got layer_types={layer_types}")
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise NotImplementedError("HFEngine does not support sliding-window attention")
        self.num_layers: int = int(config.num_hidden_layers)
        self.vocab_size: int = int(config.vocab_size)

        if eos_token_ids is None:
            gen_cfg = getattr(model, "generation_config", None)
            eos_token_ids = getattr(gen_cfg, "eos_token_id", None)
            if eos_token_ids is None:
                eos_token_ids = getattr(config, "eos_token_id", None)
        if eos_token_ids is None:
            eos_token_ids = []
        elif isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids: set[int] = {int(t) for t in eos_token_ids}
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        self.pad_token_id: int = int(pad_token_id) if pad_token_id is not None else 0

        if decode is None and tokenizer is not None:
            decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        self.decode = decode
        self.max_batch_size = int(max_batch_size)
        self.max_batch_tokens = max_batch_tokens
        self.refill_fraction = refill_fraction
        self.compact_fraction = compact_fraction

        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params

        self._rng = torch.Generator().manual_seed(seed)
        self._sessions: dict[str, _Session] = {}
        self.weight_version: int = 0

    # ------------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        rows = self._make_rows(requests)
        results: list[Completion | None] = [None] * len(rows)
        if not rows:
            return []
        # Shortest new work first: similar suffix lengths are prefilled together (less padding).
        pending = deque(sorted(rows, key=lambda r: len(r.prompt_ids) - r.cached))
        refill_at = max(1, int(self.refill_fraction * self.max_batch_size))
        batch: _Batch | None = None
        with torch.inference_mode():
            while pending or batch is not None:
                if pending:
                    live = 0 if batch is None else sum(r.finish is None for r in batch.rows)
                    free = self.max_batch_size - live
                    if batch is None or free >= min(refill_at, len(pending)):
                        admitted = self._admit(pending, batch, free)
                        if admitted:
                            new = self._prefill(admitted)
                            if batch is not None:
                                batch = self._compact(batch)
                            batch = new if batch is None else self._merge(batch, new)
                            batch = self._retire(batch, results)
                            continue
                self._decode_step(batch)
                batch = self._retire(batch, results)
        return results  # type: ignore[return-value]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``named_tensors`` (HF names; tied aliases such as ``lm_head.weight`` and, for vision-language
        models, saved-checkpoint names such as ``visual.*`` accepted) into the
        model's parameters in place. All names and shapes are checked before anything is copied; unknown
        names raise ``KeyError`` listing them. Then drops every session cache and bumps
        ``weight_version``."""
        targets: dict[str, torch.Tensor] = dict(self.model.named_parameters(remove_duplicate=False))
        for name, buf in self.model.named_buffers(remove_duplicate=False):
            targets.setdefault(name, buf)
        if self.mrope is not None:  # vision-language models also take saved-checkpoint names (Megatron export)
            for name in list(targets):
                targets.setdefault(checkpoint_name(name), targets[name])
        items = list(named_tensors)
        unknown = [name for name, _ in items if name not in targets]
        if unknown:
            raise KeyError(f"update_weights: unknown parameter names {unknown}")
        bad = [
            f"{name}: got {tuple(t.shape)}, expected {tuple(targets[name].shape)}"
            for name, t in items
            if tuple(t.shape) != tuple(targets[name].shape)
        ]
        if bad:
            raise ValueError(f"update_weights: shape mismatch for {bad}")
        with torch.no_grad():
            for name, tensor in items:
                targets[name].copy_(tensor)
        self.flush_cache()
        self.weight_version += 1

    def release_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def flush_cache(self) -> None:
        self._sessions.clear()

    def close(self) -> None:
        """Drop the session caches (the engine holds nothing else; it stays usable)."""
        self.flush_cache()

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    # ------------------------------------------------------------------------------------------------------
    # Admission and prefill
    # ------------------------------------------------------------------------------------------------------
    def _make_rows(self, requests: Sequence[GenerationRequest]) -> list[_Row]:
        # Validate everything first, so that a bad request neither consumes sessions nor engine seeds.
        seen: set[str] = set()
        for i, req in enumerate(requests):
            if not isinstance(req, GenerationRequest):
                raise TypeError(f"requests[{i}] is not a GenerationRequest: {type(req).__name__}")
            if len(req.prompt_ids) == 0:
                raise ValueError(f"requests[{i}].prompt_ids is empty")
            bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"requests[{i}].prompt_ids has ids outside [0, {self.vocab_size}): {bad[:5]}")
            if req.sampling.stop and self.decode is None:
                raise ValueError(f"requests[{i}] has stop strings but the engine has no decode/tokenizer")
            if req.vision is not None and self.mrope is None:
                raise ValueError(f"requests[{i}] carries images but the engine's model is text-only")
            if req.session_id is not None:
                if req.session_id in seen:
                    raise ValueError(f"session_id {req.session_id!r} appears twice in one generate() call")
                seen.add(req.session_id)

        rows: list[_Row] = []
        for i, req in enumerate(requests):
            sp = req.sampling
            # Seeds are drawn in request order, independently of batching.
            seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._rng))
            row = _Row(index=i, prompt_ids=list(req.prompt_ids), sampling=sp, session_id=req.session_id, seed=seed,
                       vision=req.vision)
            if self.mrope is not None:
                row.positions, row.rope_delta = self.mrope.positions(row.prompt_ids, req.vision)
            if sp.stop:
                # Stop strings are searched in the decoded tail of the generated ids; a stop string of L
                # characters completed by the newest token spans at most L tokens (+ slack for tokens
                # that decode to nothing on their own).
                row.stop_window = max(len(s) for s in sp.stop) + 16
            if req.session_id is not None:
                sess = self._sessions.pop(req.session_id, None)
                if sess is not None:
                    # At least one prompt token must be fed to get next-token logits.
                    n = min(_common_prefix(sess.ids, row.prompt_ids), len(row.prompt_ids) - 1)
                    if self.mrope is not None and self.mrope.image_token_id in row.prompt_ids[n:]:
                        n = row.prompt_ids.index(self.mrope.image_token_id)  # all images in the prefill
                    if n > 0:
                        row.cached, row.prefix = n, sess
            rows.append(row)
        return rows

    def _admit(self, pending: deque[_Row], batch: _Batch | None, free: int) -> list[_Row]:
        budget = self.max_batch_tokens
        used = 0
        if batch is not None and budget is not None:
            used = sum(len(r.prompt_ids) + r.sampling.max_new_tokens for r in batch.rows if r.finish is None)
        admitted: list[_Row] = []
        while pending and len(admitted) < free:
            r = pending[0]
            cost = len(r.prompt_ids) + r.sampling.max_new_tokens
            if budget is not None and used + cost > budget and (admitted or batch is not None):
                break  # an empty engine always takes at least one request
            admitted.append(pending.popleft())
            used += cost
        return admitted

    def _prefill(self, rows: list[_Row]) -> _Batch:
        """Prefill new rows (layout ``[pad][cached][pad][suffix]``), sample their first token."""
        n = len(rows)
        cached = [r.cached for r in rows]
        suffix = [len(r.prompt_ids) - r.cached for r in rows]
        c_w, s_w = max(cached), max(suffix)
        max_new = max(r.sampling.max_new_tokens for r in rows)
        width = c_w + s_w
        capacity = width + max_new - 1  # the last sampled token is never fed
        device = _first_param(self.model).device
        dtype = _first_param(self.model).dtype

        valid = torch.zeros(n, capacity, dtype=torch.bool)
        input_ids = torch.full((n, s_w), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            valid[i, c_w - cached[i] : c_w] = True
            valid[i, width - suffix[i] : width] = True
            input_ids[i, s_w - suffix[i] :] = torch.tensor(r.prompt_ids[r.cached :], dtype=torch.long)
        valid = valid.to(device)
        input_ids = input_ids.to(device)

        # Session prefixes, gathered into [n, H, c_w, D] per layer (zeros in the holes).
        prefixes: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_layers
        if c_w > 0:
            for layer in range(self.num_layers):
                k0, v0 = next(r.prefix.kv[layer] for r in rows if r.prefix is not None)
                pk = k0.new_zeros(n, k0.shape[0], c_w, k0.shape[2])
                pv = v0.new_zeros(n, v0.shape[0], c_w, v0.shape[2])
                for i, r in enumerate(rows):
                    if r.prefix is not None:
                        k, v = r.prefix.kv[layer]
                        pk[i, :, c_w - cached[i] :] = k[:, : cached[i]]
                        pv[i, :, c_w - cached[i] :] = v[:, : cached[i]]
                prefixes[layer] = (pk, pv)
        for r in rows:
            r.prefix = None
        layers = [_BufferLayer(length=c_w, capacity=capacity, prefix=prefixes[i]) for i in range(self.num_layers)]
        cache = _EngineCache(layers)

        extra: dict[str, torch.Tensor] = {}
        if self.mrope is None:
            pos_all = valid[:, :width].long().cumsum(-1) - 1
            position_ids = pos_all[:, c_w:].clamp_min(0)
        else:
            position_ids = torch.zeros(3, n, s_w, dtype=torch.long)
            for i, r in enumerate(rows):
                position_ids[:, i, s_w - suffix[i] :] = r.positions[:, r.cached :]
            position_ids = position_ids.to(device)
            # After the session rule a row's images are either all cached or all in its suffix.
            merged = VisionInputs.concat(
                [r.vision if self.mrope.image_token_id in r.prompt_ids[r.cached :] else None for r in rows])
            if merged is not None:
                extra = {"pixel_values": merged[0].to(device), "image_grid_thw": merged[1].to(device)}
        # 4-D mask [n, 1, s_w, width]: causal by slot, real keys only; pad queries see themselves.
        q_slot = torch.arange(c_w, width, device=device)[:, None]
        k_slot = torch.arange(width, device=device)[None, :]
        allowed = (k_slot <= q_slot)[None] & valid[:, None, :width]
        allowed |= (k_slot == q_slot)[None] & ~valid[:, c_w:width, None]
        min_val = torch.finfo(dtype).min
        mask4 = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, min_val)[:, None]
        logits = self._forward(input_ids, mask4, position_ids, cache, last_only=True, extra=extra)

        addmask = torch.full((n, capacity), min_val, dtype=dtype, device=device)
        addmask.masked_fill_(valid, 0.0)
        batch = _Batch(
            rows=rows,
            kbufs=[lay.kbuf for lay in layers],
            vbufs=[lay.vbuf for lay in layers],
            width=width,
            valid=valid,
            addmask=addmask,
            next_pos=torch.tensor([len(r.prompt_ids) for r in rows], dtype=torch.long, device=device),
            rope_delta=torch.tensor([r.rope_delta for r in rows], dtype=torch.long, device=device),
            last=torch.zeros(n, dtype=torch.long, device=device),
            step=torch.zeros(n, dtype=torch.long, device=device),
            temp=torch.tensor([r.sampling.temperature or 1.0 for r in rows], dtype=torch.float32, device=device),
            greedy=torch.tensor([r.sampling.greedy for r in rows], dtype=torch.bool, device=device),
            top_k=torch.tensor(
                [r.sampling.top_k if 0 < r.sampling.top_k < self.vocab_size else self.vocab_size for r in rows],
                dtype=torch.long,
                device=device,
            ),
            top_p=torch.tensor([r.sampling.top_p for r in rows], dtype=torch.float32, device=device),
            uniforms=self._uniforms(rows, max_new).to(device),
        )
        self._sample_and_record(batch, logits)
        return batch

    @staticmethod
    def _uniforms(rows: list[_Row], max_new: int) -> torch.Tensor:
        u = torch.zeros(len(rows), max_new, dtype=torch.float32)
        for i, r in enumerate(rows):
            if not r.sampling.greedy:
                g = torch.Generator().manual_seed(r.seed)
                u[i, : r.sampling.max_new_tokens] = torch.rand(r.sampling.max_new_tokens, generator=g)
        return u

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask4: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
        *,
        last_only: bool,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask4,
            "position_ids": position_ids,
            self._cache_kwarg: cache,
            "use_cache": True,
            **(extra or {}),
        }
        if last_only and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        return out.logits[:, -1, :].float()

    # ------------------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------------------
    def _decode_step(self, batch: _Batch) -> None:
        w = batch.width
        if w + 1 > batch.kbufs[0].shape[2]:  # merged rows may need more room than reserved
            self._reserve(batch, w + 1)
        batch.valid[:, w] = True
        batch.addmask[:, w] = 0.0
        layers = [
            _BufferLayer(kbuf=k, vbuf=v, length=w) for k, v in zip(batch.kbufs, batch.vbufs, strict=True)
        ]
        mask4 = batch.addmask[:, None, None, : w + 1]
        cache = _EngineCache(layers)
        position = (batch.next_pos + batch.rope_delta)[:, None]  # text positions; 3-D models repeat them
        logits = self._forward(batch.last[:, None], mask4, position, cache, last_only=False)
        batch.width = w + 1
        batch.next_pos += 1
        self._sample_and_record(batch, logits)

    def _sample_and_record(self, batch: _Batch, logits: torch.Tensor) -> None:
        u = batch.uniforms.gather(1, batch.step.clamp_max(batch.uniforms.shape[1] - 1)[:, None])[:, 0]
        tokens, logps = _sample(logits, batch.temp, batch.greedy, batch.top_k, batch.top_p, u, banned=self.banned)
        batch.last = tokens
        batch.step += 1
        tok_list = tokens.tolist()
        lp_list = logps.tolist()
        for i, r in enumerate(batch.rows):
            if r.finish is not None:
                continue
            t = tok_list[i]
            r.tokens.append(t)
            r.logprobs.append(lp_list[i])
            if t in self.eos_token_ids:
                r.finish = FinishReason.EOS
            elif r.stop_window and self._hit_stop(r):
                r.finish = FinishReason.STOP
            elif len(r.tokens) >= r.sampling.max_new_tokens:
                r.finish = FinishReason.LENGTH

    def _hit_stop(self, r: _Row) -> bool:
        text = self.decode(r.tokens[-r.stop_window :])  # type: ignore[misc]
        return any(s in text for s in r.sampling.stop)

    def _retire(self, batch: _Batch, results: list[Completion | None]) -> _Batch | None:
        """Emit newly finished rows (saving their session caches right away, before more slots are
        appended), and compact finished rows out once they are ``compact_fraction`` of the batch."""
        n_done = 0
        for i, r in enumerate(batch.rows):
            if r.finish is None:
                continue
            n_done += 1
            if r.emitted:
                continue
            r.emitted = True
            if r.session_id is not None:
                self._save_session(batch, i, r)
            results[r.index] = Completion(
                token_ids=r.tokens,
                logprobs=r.logprobs,
                finish_reason=r.finish,
                cached_prompt_tokens=r.cached,
                weight_version=self.weight_version,
            )
        if n_done == batch.size:
            return None
        if n_done and n_done >= self.compact_fraction * batch.size:
            return self._compact(batch)
        return batch

    def _compact(self, batch: _Batch) -> _Batch:
        keep = [i for i, r in enumerate(batch.rows) if r.finish is None]
        return batch if len(keep) == batch.size else self._select(batch, keep)

    def _save_session(self, batch: _Batch, i: int, r: _Row) -> None:
        sel = batch.valid[i, : batch.width]
        ids = r.prompt_ids + r.tokens[:-1]
        # Boolean indexing copies: the session owns its [kv_heads, len(ids), head_dim] tensors.
        w = batch.width
        kv = [(k[i, :, :w][:, sel], v[i, :, :w][:, sel]) for k, v in zip(batch.kbufs, batch.vbufs, strict=True)]
        assert kv[0][0].shape[1] == len(ids), (kv[0][0].shape, len(ids))  # the last token is never fed
        self._sessions[r.session_id] = _Session(ids=ids, kv=kv)  # type: ignore[index]

    # ------------------------------------------------------------------------------------------------------
    # Batch surgery
    # ------------------------------------------------------------------------------------------------------
    def _select(self, batch: _Batch, keep_list: list[int]) -> _Batch:
        """Keep rows ``keep_list``; drop leading slots that are holes in every kept row; keep exactly the
        room the kept rows still need (a row with ``t`` tokens will feed at most ``max_new - t`` more)."""
        keep = torch.tensor(keep_list, dtype=torch.long, device=batch.valid.device)
        rows = [batch.rows[i] for i in keep_list]
        valid = batch.valid.index_select(0, keep)
        any_valid = valid[:, : batch.width].any(0)
        start = int(any_valid.long().argmax())  # kept rows are live: each has real slots
        width = batch.width - start
        need = width + max(r.sampling.max_new_tokens - len(r.tokens) for r in rows)
        end = min(start + need, batch.kbufs[0].shape[2])

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[:, :, start:end].index_select(0, keep)

        batch.kbufs = [take(k) for k in batch.kbufs]
        batch.vbufs = [take(v) for v in batch.vbufs]
        batch.valid = valid[:, start:end]
        batch.addmask = batch.addmask[:, start:end].index_select(0, keep)
        batch.width = width
        for name in ("next_pos", "rope_delta", "last", "step", "temp", "greedy", "top_k", "top_p", "uniforms"):
            setattr(batch, name, getattr(batch, name).index_select(0, keep))
        batch.rows = rows
        return batch

    def _reserve(self, batch: _Batch, capacity: int) -> None:
        """Grow the slot capacity of ``batch`` to at least ``capacity``."""
        old = batch.kbufs[0].shape[2]
        if capacity <= old:
            return
        grow = capacity - old

        def pad(t: torch.Tensor, fill: float | bool) -> torch.Tensor:
            extra = t.new_full((*t.shape[:2], grow, *t.shape[3:]) if t.dim() == 4 else (t.shape[0], grow), fill)
            return torch.cat([t, extra], dim=2 if t.dim() == 4 else 1)

        batch.kbufs = [pad(k, 0.0) for k in batch.kbufs]
        batch.vbufs = [pad(v, 0.0) for v in batch.vbufs]
        batch.valid = pad(batch.valid, False)
        batch.addmask = pad(batch.addmask, torch.finfo(batch.addmask.dtype).min)

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        """Stack two batches, right-aligning their used slots (zero-filled holes on the left)."""
        width = max(a.width, b.width)
        rows = a.rows + b.rows
        capacity = width + max(r.sampling.max_new_tokens - len(r.tokens) for r in rows)
        min_val = torch.finfo(a.addmask.dtype).min

        def place(ta: torch.Tensor, tb: torch.Tensor, fill: float | bool) -> torch.Tensor:
            seq_dim = 2 if ta.dim() == 4 else 1
            shape = list(ta.shape)
            shape[0] = ta.shape[0] + tb.shape[0]
            shape[seq_dim] = capacity
            out = ta.new_empty(shape)
            for lo, t, w in ((0, ta, a.width), (ta.shape[0], tb, b.width)):
                hi = lo + t.shape[0]
                dst = out[lo:hi]
                if seq_dim == 2:
                    dst[:, :, : width - w] = fill
                    dst[:, :, width - w : width] = t[:, :, :w]
                else:
                    dst[:, : width - w] = fill
                    dst[:, width - w : width] = t[:, :w]
            if seq_dim == 1:
                out[:, width:] = fill
            return out

        a.kbufs = [place(x, y, 0.0) for x, y in zip(a.kbufs, b.kbufs, strict=True)]
        a.vbufs = [place(x, y, 0.0) for x, y in zip(a.vbufs, b.vbufs, strict=True)]
        a.valid = place(a.valid, b.valid, False)
        a.addmask = place(a.addmask, b.addmask, min_val)
        a.width = width
        n_u = max(a.uniforms.shape[1], b.uniforms.shape[1])
        a.uniforms = torch.cat(
            [torch.nn.functional.pad(a.uniforms, (0, n_u - a.uniforms.shape[1])),
             torch.nn.functional.pad(b.uniforms, (0, n_u - b.uniforms.shape[1]))]
        )
        for name in ("next_pos", "rope_delta", "last", "step", "temp", "greedy", "top_k", "top_p"):
            setattr(a, name, torch.cat([getattr(a, name), getattr(b, name)]))
        a.rows = rows
        return a


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _sample(
    logits: torch.Tensor,
    temp: torch.Tensor,
    greedy: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
    *,
    banned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; return ``(tokens, logprobs)``.

    ``logprobs = log_softmax(logits / T)`` at the token (``T = 1`` for greedy rows), before any top-k /
    top-p truncation. Sampled rows draw by inverse CDF with their uniform ``u`` over the truncated,
    renormalised distribution (top-k first, then top-p on the renormalised top-k mass, keeping at least
    the most likely token). Ids in ``banned`` are removed before any of that (never picked, greedy or
    sampled); their mass still counts in the reported logprobs.
    """
    logp = torch.log_softmax(logits / temp[:, None], dim=-1)
    full_logp = logp
    if banned is not None:  # never sampled; the reported logprob stays the full distribution's
        logp = logp.index_fill(-1, banned, float("-inf"))
    tokens = logp.argmax(dim=-1)
    sample_rows = ~greedy
    if bool(sample_rows.any()):
        vocab = logp.shape[-1]
        probs = logp.exp()
        if bool(((top_k < vocab) | (top_p < 1.0))[sample_rows].any()):
            # Truncation masks are computed in sorted order, then scattered back: every sampled row is
            # drawn in vocab order by the same code, so a draw never depends on the rest of the batch.
            sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
            rank = torch.arange(vocab, device=logp.device)
            keep = rank[None, :] < top_k[:, None]
            sorted_p = sorted_p * keep
            cum = sorted_p.cumsum(-1)
            exclusive = (cum - sorted_p) / cum[:, -1:]
            keep &= (exclusive < top_p[:, None]) | (top_p[:, None] >= 1.0)
            probs = probs * torch.zeros_like(keep).scatter_(1, order, keep)
        cdf = probs.cumsum(-1)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        # u * total can round up to total: fall back to the last token with non-zero probability.
        last_pos = torch.where(probs > 0, torch.arange(vocab, device=logp.device), 0).amax(-1)
        tokens = torch.where(sample_rows, torch.minimum(idx, last_pos), tokens)
    return tokens, full_logp.gather(1, tokens[:, None])[:, 0]


def eos_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a completion: the model's generation-config EOS (one or a list) and the
    tokenizer's EOS."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
