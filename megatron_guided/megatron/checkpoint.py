"""Megatron training state in `dist_checkpointing` (torch_dist) format: model, optimizer and the
worker's counters. Tensors are stored by their global identity (layer index, full shape, offsets),
so a checkpoint saved at one TP/PP loads at another.

The optimizer state reshards with the model when it is the plain (non-distributed) Megatron
optimizer. The distributed optimizer is saved `dp_reshardable` (megatron-core 0.16.1's
`fully_reshardable` does not restore Adam's `step`): it resumes at another DP size but the same
TP/PP; `load_training_state` says so instead of loading wrong moments.

Atomicity is the caller's: the trainer writes into a temporary checkpoint folder and renames it.

Saving uses :func:`sync_save_strategy`: megatron-core's default torch_dist writer starts a
`multiprocessing` Manager, which a daemonic rank process (`LocalWorkerGroup`) may not do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_guided.megatron.layout import ParallelLayout


MODEL_DIR = "dist_ckpt"
LAYOUT_FILE = "layout.json"


def sync_save_strategy(planner_class=None):
    """Megatron's torch_dist save strategy writing synchronously with PyTorch's `FileSystemWriter` (one
    thread, fsync; same files and metadata, no helper processes). `planner_class` (default
    `MCoreSavePlanner`) may override how tensor data is obtained."""
    from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner, TorchDistSaveShardedStrategy,
                                                                   _replace_state_dict_keys_with_sharded_keys,
                                                                   mcore_to_pyt_state_dict)
    from torch.distributed import checkpoint as dcp

    planner_class = planner_class or MCoreSavePlanner

    class SyncTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            dcp.save(mcore_to_pyt_state_dict(by_key, False),
                     storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=True),
                     planner=planner_class(dedup_replicated_tensors=not self.keep_only_main_replica,
                                           flatten_state_dict=False))

    return SyncTorchDistSave("torch_dist", 1, thread_count=1)


def _optimizer_metadata(distributed_optimizer: bool) -> dict[str, str] | None:
    return {"distrib_optim_sharding_type": "dp_reshardable"} if distributed_optimizer else None


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """Megatron-LM's convention: `model`, or `model0`, `model1`, … with virtual pipeline stages."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _rng_states() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _rng_sharded_object(states: list[dict[str, Any]] | None):
    """The RNG states of every DP rank of this (pp, tp) position, stored once per position
    (Megatron-LM's layout: global shape (pp, tp), replicated over DP/CP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", states, (ps.get_pipeline_model_parallel_world_size(),
                                               ps.get_tensor_model_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def _restore_rng(states: list[dict[str, Any]]) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    state = states[ps.get_data_parallel_rank(with_context_parallel=True)]
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _load_chunks(loaded: dict[str, Any], chunks: list[torch.nn.Module]) -> None:
    for key, chunk in zip(model_sharded_state_dict(chunks), chunks):
        chunk.load_state_dict(loaded[key])


def save_training_state(path: Path, chunks: list[torch.nn.Module], optimizer, extra: dict[str, Any], *,
                        layout: ParallelLayout, distributed_optimizer: bool) -> None:
    """Collective: every rank calls it with the same `path`."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    target = path / MODEL_DIR
    if torch.distributed.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
        (path / LAYOUT_FILE).write_text(json.dumps(
            {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp, "dp": layout.dp,
             "distributed_optimizer": distributed_optimizer}, indent=2))
    torch.distributed.barrier()
    state = model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_optimizer_metadata(distributed_optimizer))
    state["extra"] = extra
    rng = [None] * ps.get_data_parallel_world_size(with_context_parallel=True)
    torch.distributed.all_gather_object(rng, _rng_states(), group=ps.get_data_parallel_group(with_context_parallel=True))
    state["rng_state"] = _rng_sharded_object(rng)
    dist_checkpointing.save(state, str(target), sharded_strategy=sync_save_strategy(),
                            content_metadata=_optimizer_metadata(distributed_optimizer))
    torch.distributed.barrier()


def saved_layout(path: Path) -> dict[str, Any]:
    file = Path(path) / LAYOUT_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a Megatron training checkpoint (no {LAYOUT_FILE})")
    return json.loads(file.read_text())


@torch.no_grad()
def load_training_state(path: Path, chunks: list[torch.nn.Module], optimizer, *, layout: ParallelLayout,
                        distributed_optimizer: bool) -> dict[str, Any]:
    """Collective. Loads model and optimizer into place, and the RNG states where the layout is the
    saved one (dropout streams cannot be mapped to other ranks); returns the saved `extra` dict."""
    from megatron.core import dist_checkpointing

    saved = saved_layout(path)
    if saved["distributed_optimizer"] != distributed_optimizer:
        raise ValueError(f"{path} was saved with use_distributed_optimizer={saved['distributed_optimizer']}; "
                         f"resume with the same worker.actor.megatron.use_distributed_optimizer")
    if distributed_optimizer and (saved["tp"], saved["pp"], saved["vpp"]) != (layout.tp, layout.pp, layout.vpp):
        raise ValueError(f"{path}: distributed-optimizer state was saved at tp={saved['tp']} pp={saved['pp']} "
                         f"vpp={saved['vpp']} and reshards over DP only; resume at that tp/pp/vpp, or save with "
                         f"worker.actor.megatron.use_distributed_optimizer=false to change them")
    state = model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                      metadata=_optimizer_metadata(distributed_optimizer))
    state["extra"] = None
    same_layout = all(saved[k] == getattr(layout, k) for k in ("tp", "pp", "cp", "dp"))
    if same_layout:
        state["rng_state"] = _rng_sharded_object(None)
    loaded = dist_checkpointing.load(state, str(path / MODEL_DIR))
    _load_chunks(loaded, chunks)
    optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        _restore_rng(loaded["rng_state"])
    return loaded["extra"]


def is_megatron_model_dir(path: str | Path) -> bool:
    return (Path(path) / MODEL_DIR).is_dir()


@torch.no_grad()
def load_model_weights(path: str | Path, chunks: list[torch.nn.Module]) -> None:
    """Model weights only, from `path/dist_ckpt` (a converted model or a training checkpoint), at this
    run's TP/PP whatever they were when saved. Collective."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), str(Path(path) / MODEL_DIR))
    _load_chunks(loaded, chunks)
