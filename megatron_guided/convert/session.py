"""The converter's own Megatron: one rank in this process, and a GPTModel that holds no memory.

The conversion never runs a forward pass; it only needs what `GPTModel.sharded_state_dict()` says
about each tensor (checkpoint key, global shape and offset, dtype, and the factories that split
`linear_fc1` into gate and up). So the model is built on the `meta` device at TP = PP = 1 (the
dist_checkpointing format stores global tensors, so TP = 1 describes every layout), inside a
one-rank gloo group with `megatron.core.parallel_state` initialised, and torn down afterwards. A
72B model costs no memory here. The CUDA compatibility layer is not needed for that (no CUDA
device is asked for when `use_cpu_initialization` is set), so this can run in any process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_guided.megatron import compat
from megatron_guided.megatron.layout import ParallelLayout
from megatron_guided.megatron.model import build_chunks, transformer_config


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """torch.distributed (gloo, world size 1, in-memory store: no port) and Megatron's parallel state
    at TP = PP = 1 for the duration of the block. Reuses a process group that already exists."""
    from megatron.core import parallel_state as ps

    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    compat.seed_model_parallel_rng(0)
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        if owns_group:
            torch.distributed.destroy_process_group()


def meta_model(hf_config, *, padded_vocab: int, dtype: torch.dtype) -> torch.nn.Module:
    """The GPTModel (local layer spec, every layer, pre and post process) for `hf_config` on the meta
    device, its vocabulary padded to `padded_vocab` rows. Call inside :func:`single_rank`."""
    if padded_vocab < hf_config.vocab_size:
        raise ValueError(f"padded vocabulary {padded_vocab} < vocab_size={hf_config.vocab_size}")
    # build_chunks pads to a multiple of make_vocab_size_divisible_by × tp: with the padded size itself
    # as the multiple (and tp = 1) that is exactly `padded_vocab`.
    layout = ParallelLayout(make_vocab_size_divisible_by=padded_vocab)
    config = transformer_config(hf_config, layout, params_dtype=dtype)
    config.use_cpu_initialization = True  # no torch.cuda.current_device() in parameter creation
    config.perform_initialization = False
    with torch.device("meta"):
        (model,) = build_chunks(hf_config, layout, config, use_te=False)
    return model
