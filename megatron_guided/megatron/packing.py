"""Micro-batch layouts for Transformer Engine attention on GPUs: packed THD sequences and context-
parallel splits. Pure tensor functions (tested on CPU; the attention that consumes them needs TE).

THD packing. A micro-batch of B right-padded rows becomes one row of T = Σ padded lengths tokens:
sequence i occupies [cu[i], cu[i+1]) with positions restarting at 0, its length rounded up to
`multiple` (16 for FP8 GEMMs, × TP with sequence parallelism) with padding that only follows real
tokens. `targets[j]` is the next token of the same sequence (0 at a sequence's last position), so
per-token logprobs on the packed row map back to the targets-aligned `[B, L-1]` layout of
`train.batch` by `unpack`.

Context parallelism (padded layout). The sequence (length S, padded to a multiple of 2·cp) is cut
into 2·cp chunks and rank r keeps chunks r and 2·cp-1-r, so every rank gets the same amount of
causal-attention work (Megatron's load-balanced split).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class PackedRows:
    input_ids: Tensor  # [1, T]
    position_ids: Tensor  # [1, T]
    targets: Tensor  # [1, T] next token within the same sequence, 0 where there is none
    cu_seqlens: Tensor  # [B + 1] int32, padded sequence boundaries
    max_seqlen: int
    rows: Tensor  # [N] row in [B, L-1] of each packed position that predicts a real token
    cols: Tensor  # [N] column in [B, L-1]
    index: Tensor  # [N] position in the packed row

    def packed_seq_params(self, device: torch.device):
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens.to(device)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack_rows(input_ids: Tensor, seq_lens: Tensor, *, multiple: int = 1, pad_token_id: int = 0) -> PackedRows:
    """Right-padded `input_ids [B, L]` with true lengths `seq_lens [B]` → one packed THD row."""
    lengths = [int(n) for n in seq_lens]
    padded = [round_up(n, multiple) for n in lengths]
    total = sum(padded)
    ids = torch.full((total,), pad_token_id, dtype=input_ids.dtype)
    positions = torch.zeros(total, dtype=torch.long)
    targets = torch.zeros(total, dtype=input_ids.dtype)
    rows, cols, index = [], [], []
    start = 0
    for i, (n, p) in enumerate(zip(lengths, padded)):
        ids[start:start + n] = input_ids[i, :n]
        positions[start:start + p] = torch.arange(p)
        targets[start:start + n - 1] = input_ids[i, 1:n]
        rows.append(torch.full((n - 1,), i))
        cols.append(torch.arange(n - 1))
        index.append(torch.arange(start, start + n - 1))
        start += p
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(padded), 0).tolist()], dtype=torch.int32)
    return PackedRows(input_ids=ids[None], position_ids=positions[None], targets=targets[None], cu_seqlens=cu,
                      max_seqlen=max(padded), rows=torch.cat(rows), cols=torch.cat(cols), index=torch.cat(index))


def unpack(values: Tensor, packed: PackedRows, shape: tuple[int, int]) -> Tensor:
    """Per-position `values [T]` of the packed row → targets-aligned `[B, L-1]` (zeros elsewhere).
    Differentiable: gradients flow back to `values`."""
    out = values.new_zeros(shape)
    return out.index_put((packed.rows.to(values.device), packed.cols.to(values.device)),
                         values[packed.index.to(values.device)])


def context_parallel_index(length: int, *, rank: int, size: int) -> Tensor:
    """Positions (of a sequence padded to a multiple of 2·size) that context-parallel rank `rank` keeps."""
    if length % (2 * size):
        raise ValueError(f"sequence length {length} is not a multiple of 2 × cp = {2 * size}")
    chunk = length // (2 * size)
    first, second = rank, 2 * size - 1 - rank
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                      torch.arange(second * chunk, (second + 1) * chunk)])


def position_aligned(per_target: Tensor, length: int) -> Tensor:
    """Targets-aligned `[B, L-1]` → position-aligned `[B, length]` (position t predicts t+1), zero-padded,
    so that it can be cut along the sequence like the inputs."""
    return torch.nn.functional.pad(per_target, (0, length - per_target.shape[1]))
