"""Test stand-in for the CUDA package ``sgl_kernel`` (see ``tests/sglang_stubs/README.md``).

Only :func:`assign_req_to_token_pool_cpu` is implemented (plain torch); every other attribute is a
callable that raises, so SGLang's CPU engine imports but a CUDA-only path fails loudly if reached.
"""

from __future__ import annotations

import torch


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,  # [B] rows of req_to_token
    req_to_token: torch.Tensor,  # [max_reqs, pool_len] token slot per (request, position)
    start_offset: torch.Tensor,  # [B] first position to write
    end_offset: torch.Tensor,  # [B] one past the last position to write
    out_cache_loc: torch.Tensor,  # [sum(end - start)] new slots, request after request
    pool_len: int,
) -> None:
    """For each request i: ``req_to_token[req_pool_indices[i], start[i]:end[i]]`` = the next
    ``end[i] - start[i]`` entries of ``out_cache_loc``."""
    offset = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        if end > pool_len:
            raise IndexError(f"assign_req_to_token_pool_cpu: end offset {end} exceeds pool_len {pool_len}")
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


class _CudaOnly:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"sgl_kernel.{self.name} is CUDA-only; this CPU test stand-in does not provide it")


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _CudaOnly(name)


# Looked up from ``torch.ops.sgl_kernel`` when ``sglang.srt.models.qwen3_5`` is imported on CPU (the Qwen-VL
# multimodal processor imports that module); never called for the models served here. Only these names:
# SGLang probes other ops with ``hasattr`` to pick CPU-kernel paths, and those probes must stay False.
IMPORT_TIME_OPS = frozenset({
    "fused_sigmoid_mul_cpu",
    "fused_qk_gemma_rmsnorm_cpu",
    "fused_qk_gemma_rmsnorm_with_gate_cpu",
    "fused_qkvzba_split_reshape_cat_contiguous_cpu",
})


class _CpuOpNamespace(torch._ops._OpNamespace):
    """``torch.ops.sgl_kernel`` where the real package registers its CPU kernels: :data:`IMPORT_TIME_OPS`
    resolve to placeholders that raise when called; everything else is missing, as without the package."""

    def __getattr__(self, op_name: str):
        if op_name in IMPORT_TIME_OPS:
            return _CudaOnly(f"ops.{op_name}")
        return super().__getattr__(op_name)


torch.ops.sgl_kernel = _CpuOpNamespace("sgl_kernel")
