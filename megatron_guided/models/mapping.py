"""HF ↔ Megatron-Core weight mapping as data: name patterns plus typed transforms, each implementing
both directions and tensor-parallel sharding. Shared by the Megatron backend and `tools/` conversion.

A transform turns the HF tensors of one Megatron parameter into that parameter's TP shards
(`to_megatron`), and the shards back into the HF tensors (`to_hf`). Layouts (from megatron-core's
GPTModel, local spec):
- `linear_qkv`: rows grouped per query group g: [q heads of g; k_g; v_g]; column-parallel, so TP rank
  r holds query groups [r·G/tp, (r+1)·G/tp).
- `linear_fc1`: [gate; up] *per TP rank*: rank r holds [gate shard r; up shard r].
- column-parallel (split dim 0): embeddings and output layer (vocab), q/k/v, fc1.
- row-parallel (split dim 1): `linear_proj`, `linear_fc2`. Norms are replicated.
- vocabulary rows are padded with zeros up to `padded_vocab_size` (a multiple of
  `make_vocab_size_divisible_by × TP`) before the split; export drops the padded rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the transforms need to know of the model besides the tensors themselves."""

    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int


def _owned(chunks, tp: int) -> list[Tensor]:
    """TP shards that own their memory (a view would drag the whole tensor along when pickled or
    saved). With TP = 1 the single chunk is the whole tensor already: no copy."""
    return list(chunks) if tp == 1 else [t.clone() for t in chunks]


class Replicated:
    """Same tensor on every TP rank (norms)."""

    def to_megatron(self, hf: list[Tensor], *, tp: int, shape: ModelShape) -> list[Tensor]:
        return [hf[0].clone() for _ in range(tp)]

    def to_hf(self, shards: list[Tensor], *, shape: ModelShape) -> list[Tensor]:
        return [shards[0].clone()]


@dataclass(frozen=True)
class Split:
    """Chunked along `dim` across TP ranks (0: column-parallel, 1: row-parallel)."""

    dim: int

    def to_megatron(self, hf: list[Tensor], *, tp: int, shape: ModelShape) -> list[Tensor]:
        if hf[0].shape[self.dim] % tp:
            raise ValueError(f"dimension {self.dim} of size {hf[0].shape[self.dim]} does not divide by TP={tp}")
        return _owned(torch.chunk(hf[0], tp, dim=self.dim), tp)

    def to_hf(self, shards: list[Tensor], *, shape: ModelShape) -> list[Tensor]:
        return [torch.cat(shards, dim=self.dim)]


class VocabSplit:
    """Vocabulary rows (embeddings, output layer): zero-padded to `padded_vocab_size`, then split
    across TP like `Split(0)`; `to_hf` drops the padded rows again."""

    def to_megatron(self, hf: list[Tensor], *, tp: int, shape: ModelShape) -> list[Tensor]:
        rows = hf[0].shape[0]
        if rows != shape.vocab_size:
            raise ValueError(f"vocabulary tensor has {rows} rows, the config says vocab_size={shape.vocab_size}")
        if shape.padded_vocab_size % tp:
            raise ValueError(f"padded vocab size {shape.padded_vocab_size} does not divide by TP={tp}")
        padded = hf[0].new_zeros((shape.padded_vocab_size, *hf[0].shape[1:]))
        padded[:rows] = hf[0]
        return _owned(torch.chunk(padded, tp, dim=0), tp)

    def to_hf(self, shards: list[Tensor], *, shape: ModelShape) -> list[Tensor]:
        full = shards[0] if len(shards) == 1 else torch.cat(shards, dim=0)
        return [full[: shape.vocab_size].clone()]


class QKV:
    """HF q, k, v (weights [out, hidden] or biases [out]) ↔ Megatron's per-group interleaved linear_qkv."""

    def to_megatron(self, hf: list[Tensor], *, tp: int, shape: ModelShape) -> list[Tensor]:
        q, k, v = hf
        groups, per_group, d = shape.num_query_groups, shape.num_heads // shape.num_query_groups, shape.head_dim
        if groups % tp:
            raise ValueError(f"num_query_groups={groups} does not divide by TP={tp}")
        q = q.reshape(groups, per_group * d, *q.shape[1:])
        k = k.reshape(groups, d, *k.shape[1:])
        v = v.reshape(groups, d, *v.shape[1:])
        fused = torch.cat([q, k, v], dim=1)  # [groups, (per_group + 2)·d, ...]
        return _owned([c.reshape(-1, *c.shape[2:]) for c in torch.chunk(fused, tp, dim=0)], tp)

    def to_hf(self, shards: list[Tensor], *, shape: ModelShape) -> list[Tensor]:
        groups, per_group, d = shape.num_query_groups, shape.num_heads // shape.num_query_groups, shape.head_dim
        fused = torch.cat(shards, dim=0).reshape(groups, (per_group + 2) * d, *shards[0].shape[1:])
        q, k, v = torch.split(fused, [per_group * d, d, d], dim=1)
        return [t.reshape(-1, *t.shape[2:]).clone() for t in (q, k, v)]


class GatedMLP:
    """HF gate_proj, up_proj ↔ linear_fc1 holding [gate shard; up shard] on each TP rank."""

    def to_megatron(self, hf: list[Tensor], *, tp: int, shape: ModelShape) -> list[Tensor]:
        gate, up = (torch.chunk(t, tp, dim=0) for t in hf)
        return [torch.cat([g, u], dim=0) for g, u in zip(gate, up)]

    def to_hf(self, shards: list[Tensor], *, shape: ModelShape) -> list[Tensor]:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]


@dataclass(frozen=True)
class Rule:
    megatron: str
    """Megatron name, `{i}` standing for the (global) layer index."""
    hf: tuple[str, ...]
    transform: object


def expand(rule: Rule, layer: int | None) -> tuple[str, tuple[str, ...]]:
    fill = (lambda s: s.format(i=layer)) if layer is not None else (lambda s: s)
    return fill(rule.megatron), tuple(fill(h) for h in rule.hf)


def hf_to_megatron(hf_state: dict[str, Tensor], rules: list[Rule], *, layers: Iterable[int], tp: int,
                   shape: ModelShape) -> list[dict[str, Tensor]]:
    """One Megatron state dict per TP rank, for the (global) decoder layers `layers` and whichever
    non-layer tensors `hf_state` holds. HF names no rule consumed are an error listing them."""
    layers = list(layers)
    shards: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    used: set[str] = set()
    for rule in rules:
        for layer in (layers if "{i}" in rule.megatron else [None]):
            name, hf_names = expand(rule, layer)
            if not all(h in hf_state for h in hf_names):
                missing = [h for h in hf_names if h not in hf_state]
                if any(h in hf_state for h in hf_names):
                    raise KeyError(f"{name} needs {list(hf_names)}; missing {missing}")
                continue  # optional parameter absent (e.g. no bias, tied output layer)
            for rank, tensor in enumerate(rule.transform.to_megatron([hf_state[h] for h in hf_names], tp=tp,
                                                                     shape=shape)):
                shards[rank][name] = tensor
            used.update(hf_names)
    leftover = sorted(set(hf_state) - used)
    if leftover:
        raise KeyError(f"HF parameters with no mapping rule: {leftover}")
    return shards


def megatron_to_hf(shards: list[dict[str, Tensor]], rules: list[Rule], *, layers: Iterable[int],
                   shape: ModelShape) -> dict[str, Tensor]:
    """Merge TP shards (global layer names) back into HF-named tensors. Megatron names no rule
    consumed are an error."""
    layers = list(layers)
    hf: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        for layer in (layers if "{i}" in rule.megatron else [None]):
            name, hf_names = expand(rule, layer)
            if name not in shards[0]:
                continue
            hf.update(zip(hf_names, rule.transform.to_hf([s[name] for s in shards], shape=shape)))
            used.add(name)
    leftover = sorted(set(shards[0]) - used)
    if leftover:
        raise KeyError(f"Megatron parameters with no mapping rule: {leftover}")
    return hf

