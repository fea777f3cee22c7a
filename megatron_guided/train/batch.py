"""Trajectories → padded training tensors, and their split into mini- and micro-batches.

Per-token tensors are aligned with *targets*: column t describes token ``input_ids[:, t + 1]``,
which the model predicts from position t. So ``loss_mask[:, t] = 1`` trains the prediction of
token t + 1, and every per-token tensor is ``[B, L - 1]`` for ``input_ids [B, L]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_guided.rollout.trajectory import Trajectory


@dataclass(kw_only=True, slots=True)
class TrainBatch:
    input_ids: Tensor  # [B, L] prompt + response, right-padded with pad_token_id
    attention_mask: Tensor  # [B, L] 1 on real tokens
    loss_mask: Tensor  # [B, L-1] float, 1 where the target token is a policy token
    advantages: Tensor  # [B, L-1]
    rollout_logprobs: Tensor  # [B, L-1] logprobs the generation engine reported (0 off-mask)
    old_logprobs: Tensor | None = None  # [B, L-1] behaviour-policy logprobs from the trainer
    ref_logprobs: Tensor | None = None  # [B, L-1] reference-policy logprobs (KL)
    vision: tuple | None = None
    """Per row its prompt's VisionInputs (None for a text row); None when no row has images. Backends
    turn it into pixel values and m-RoPE positions over the whole row (models/vision.py)."""

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_lens(self) -> Tensor:  # [B]
        return self.attention_mask.sum(-1)

    def select(self, rows: Sequence[int] | Tensor, *, trim: bool = True) -> TrainBatch:
        """Rows `rows`, with the common right padding trimmed away when `trim`."""
        index = torch.as_tensor(rows, dtype=torch.long)
        length = int(self.attention_mask[index].sum(-1).max()) if trim else self.input_ids.shape[1]
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                fields[f.name] = None
            elif f.name == "vision":
                fields[f.name] = tuple(value[i] for i in index.tolist())
            else:
                width = length if value.shape[1] == self.input_ids.shape[1] else length - 1
                fields[f.name] = value[index, :width]
        return TrainBatch(**fields)

    def to(self, device: torch.device | str) -> TrainBatch:
        """Tensors moved to `device`; images stay where they are (the forward moves them)."""
        return TrainBatch(**{f.name: getattr(self, f.name) if getattr(self, f.name) is None or f.name == "vision"
                             else getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def build_train_batch(trajectories: Sequence[Trajectory], *, pad_token_id: int) -> TrainBatch:
    """Pad trajectories into a TrainBatch (advantages zero until the estimator fills them)."""
    seqs = [t.prompt_ids + t.response_ids for t in trajectories]
    batch, length = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    loss_mask = torch.zeros((batch, length - 1))
    rollout_logprobs = torch.zeros((batch, length - 1))
    for i, (traj, seq) in enumerate(zip(trajectories, seqs)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        start, end = len(traj.prompt_ids) - 1, len(seq) - 1
        loss_mask[i, start:end] = torch.tensor(traj.loss_mask, dtype=torch.float32)
        rollout_logprobs[i, start:end] = torch.tensor(traj.rollout_logprobs, dtype=torch.float32)
    vision = tuple(t.vision for t in trajectories)
    return TrainBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                      advantages=torch.zeros_like(loss_mask), rollout_logprobs=rollout_logprobs,
                      vision=vision if any(v is not None for v in vision) else None)


def split_by_token_budget(lengths: Sequence[int], *, max_tokens: int, max_rows: int) -> list[list[int]]:
    """Group row indices into micro-batches, longest first, each within `max_tokens` padded tokens
    (rows × longest row) and `max_rows` rows. Sorting by length keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > max_tokens or len(current) >= max_rows):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups
