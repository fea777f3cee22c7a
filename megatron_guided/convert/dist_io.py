"""The Megatron side of a conversion on disk: a `dist_checkpointing` (torch_dist) checkpoint written
tensor by tensor, and read back a few tensors at a time.

Writing. `dist_checkpointing.save` is called with the meta GPTModel's `sharded_state_dict()` (so
keys, global shapes, offsets, factories and `_extra_state` objects are Megatron's own) and a save
strategy that differs from Megatron's torch_dist strategy in one way only: tensor data is produced
when PyTorch's checkpoint writer asks for it (`SavePlanner.resolve_data`, called once per tensor
shard in write order), by a `produce(key, global_offset)` callback, instead of being held by the
state dict. The file writer is PyTorch's synchronous `FileSystemWriter` (one thread, fsync; see
:func:`megatron_guided.megatron.checkpoint.sync_save_strategy`), so one tensor is in memory at a time. The result is the ordinary torch_dist layout (`.metadata`,
`__0_0.distcp`, `common.pt`, `metadata.json`) that Megatron loads at any TP/PP.

Reading. `dist_checkpointing.load` with a sub-dict of the same `sharded_state_dict()` (one decoder
layer, say) reads only those tensors; factories merge the gate/up halves back into `linear_fc1`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megatron_guided.megatron.checkpoint import sync_save_strategy

ShardProducer = Callable[[str, tuple[int, ...]], Tensor]


def _lazy_strategy(produce: ShardProducer):
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            data = produce(write_item.index.fqn, tuple(write_item.index.offset))
            return data.reshape(write_item.tensor_data.chunk.sizes)  # layer tensors carry the layer axis

    return sync_save_strategy(LazyPlanner)


def shard_sources(model_state: dict[str, Any]) -> dict[tuple[str, tuple[int, ...]], tuple[str, Any, int | None]]:
    """(checkpoint key, global offset) of every tensor shard `model_state` (a `sharded_state_dict()`)
    will write → (state-dict name of the parameter, its ShardedTensor or factory, index among the
    factory's outputs or None)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    sources = {}
    for name, entry in model_state.items():
        if isinstance(entry, ShardedTensor):
            sources[(entry.key, tuple(entry.global_offset))] = (name, entry, None)
        elif isinstance(entry, ShardedTensorFactory):
            for j, part in enumerate(entry.build()):
                sources[(part.key, tuple(part.global_offset))] = (name, entry, j)
    return sources


def shard_data(entry: Any, index: int | None, param: Tensor) -> Tensor:
    """The data one shard holds when its parameter's value is `param`."""
    if index is None:
        return param.reshape(entry.local_shape)
    saved = entry.data
    entry.data = param
    try:
        return entry.build()[index].data
    finally:
        entry.data = saved


def save_streaming(sharded_state_dict: dict[str, Any], directory: Path, produce: ShardProducer) -> None:
    """`dist_checkpointing.save` of `sharded_state_dict` (meta tensors allowed) into the empty folder
    `directory`, each tensor shard's data coming from `produce(key, global_offset)`."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, str(directory), sharded_strategy=_lazy_strategy(produce))


def stored_tensors(directory: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor key of a torch_dist checkpoint with its global shape and dtype (metadata only)."""
    from megatron.core import dist_checkpointing

    return {key: (tuple(meta.global_shape), meta.dtype)
            for key, meta in dist_checkpointing.load_tensors_metadata(str(directory)).items()}


def _ordinary_axes(part, dtype: torch.dtype):
    """The same shard request with a real buffer in `dtype`, its prepended (layer) axes made ordinary
    ones: megatron-core reads a subset of a tensor's shards only in that form."""
    ones = (1,) * part.prepend_axis_num
    return dataclasses.replace(part, data=torch.empty(ones + tuple(part.local_shape), dtype=dtype), dtype=dtype,
                               local_shape=ones + tuple(part.local_shape), prepend_axis_num=0)


def load_entries(entries: dict[str, Any], directory: Path, dtypes: dict[str, torch.dtype]) -> dict[str, Tensor]:
    """Read only the tensors of some entries of a meta model's `sharded_state_dict()` (state-dict name
    → ShardedTensor or factory), in their stored dtypes (`dtypes`, by checkpoint key). Returns
    state-dict name → full (TP = 1) tensor; factories are merged (gate and up → `linear_fc1`)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    parts = {}
    for name, entry in entries.items():
        if isinstance(entry, ShardedTensorFactory):
            built = dataclasses.replace(entry, data=torch.empty(entry.data.shape, device="meta")).build()
            parts[name] = [_ordinary_axes(p, dtypes[p.key]) for p in built]
        else:
            parts[name] = [_ordinary_axes(entry, dtypes[entry.key])]
    # a subset on purpose: the "every shard read exactly once" check does not apply
    loaded = dist_checkpointing.load({"model": parts}, str(directory), validate_access_integrity=False)["model"]
    out = {}
    for name, entry in entries.items():
        tensors = loaded[name]
        if isinstance(entry, ShardedTensorFactory):
            shapes = [entry.data.shape[0] // len(tensors), *entry.data.shape[1:]]
            out[name] = entry.merge_fn([t.reshape(shapes) for t in tensors])
        else:
            out[name] = tensors[0].reshape(entry.local_shape)
    return out
